"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learn the embedding of a new
placeholder token (``num_vectors`` consecutive tokens) so that prompts with it produce the concept; the whole
model, every other token row included, stays frozen. With several text encoders (SDXL) the placeholder gets
one vector set per encoder, each trained. Exports the files AUTOMATIC1111, ComfyUI and diffusers read (SDXL:
``{"clip_l": [n, 768], "clip_g": [n, 1280]}``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ldm.io.embeddings import EMBEDDING_FORMATS, EMBEDDING_SUFFIXES, save_embedding
from ldm.io.sdxl_embeddings import save_sdxl_embedding
from ldm.models.finetune.method import FineTuneMethod, check_state_keys
from ldm.models.finetune.text_parts import text_parts
from ldm.modules.adapters.token_embeddings import PlaceholderEmbedding

if TYPE_CHECKING:
    from ldm.models.finetune.module import FineTuneModule

STATE_KEY = "placeholder_vectors"  # the first text encoder's; SDXL's second: placeholder_vectors_2


def state_key(index: int) -> str:
    return STATE_KEY if index == 0 else f"{STATE_KEY}_{index + 1}"


class TextualInversion(FineTuneMethod):
    """placeholder: the token to write in prompts (e.g. ``<star>``); num_vectors: embedding vectors it stands
    for; initializer_word: text whose token embeddings start the vectors (cycled), None = random;
    export_format: ``a1111`` (``{"emb_params": [n, dim]}`` .safetensors), ``diffusers`` (``{placeholder: [n,
    dim]}``) or ``a1111_pt`` (AUTOMATIC1111's ``.pt``) -- an SDXL base writes ``{"clip_l", "clip_g"}``, as
    .safetensors or (``a1111_pt``) that dict pickled; AUTOMATIC1111 names the token after the file;
    weight_decay: on the vectors only (the rest of the embedding is not in the optimiser at all)."""

    trains_text_encoder = True

    def __init__(
        self,
        placeholder: str = "<concept>",
        num_vectors: int = 1,
        initializer_word: str | None = None,
        export_format: str = "a1111",
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if export_format not in EMBEDDING_FORMATS:
            raise ValueError(f"export_format must be one of {EMBEDDING_FORMATS}, got {export_format!r}")
        self.placeholder, self.num_vectors = str(placeholder), int(num_vectors)
        self.initializer_word, self.export_format = initializer_word, export_format
        self.export_suffix = EMBEDDING_SUFFIXES[export_format]
        self.weight_decay = float(weight_decay)
        self.embeddings: list[PlaceholderEmbedding] = []
        self.encoders: list[nn.Module] = []

    @property
    def embedding(self) -> PlaceholderEmbedding | None:
        """The first text encoder's placeholder vectors (the only ones of an SD 1.x/2.x base)."""
        return self.embeddings[0] if self.embeddings else None

    def attach(self, model: FineTuneModule) -> None:
        encoders = list(text_parts(model).values())
        for encoder in encoders:
            if not hasattr(encoder, "add_placeholder"):
                raise TypeError(f"textual inversion needs a CLIPTextEncoder, got {type(encoder).__name__}")
        for encoder in encoders:
            ids = encoder.add_placeholder(self.placeholder, self.num_vectors, init_text=self.initializer_word)
            embedding = PlaceholderEmbedding(encoder.token_embedding, ids)
            encoder.transformer.text_model.embeddings.token_embedding = embedding
            encoder.clear_cache()
            self.embeddings.append(embedding)
        self.encoders, self.model = encoders, model

    def _require_attached(self) -> list[PlaceholderEmbedding]:
        if not self.embeddings:
            raise RuntimeError("TextualInversion is not attached to a model yet (attach(model) first)")
        return self.embeddings

    def _clear_caches(self) -> None:
        for encoder in self.encoders:
            encoder.clear_cache()

    def parameters(self) -> list[nn.Parameter]:
        return [embedding.vectors for embedding in self._require_attached()]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.parameters(), "weight_decay": self.weight_decay}]

    def state_dict(self) -> dict[str, Tensor]:
        return {state_key(i): e.vectors.detach().clone() for i, e in enumerate(self._require_attached())}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        embeddings = self._require_attached()
        check_state_keys({state_key(i) for i in range(len(embeddings))}, state, "textual inversion")
        for i, embedding in enumerate(embeddings):
            vectors = state[state_key(i)]
            if vectors.shape != embedding.vectors.shape:
                raise ValueError(
                    f"textual inversion: checkpoint vectors have shape {tuple(vectors.shape)}, this run "
                    f"needs {tuple(embedding.vectors.shape)} (num_vectors x hidden size); resume with the "
                    "same model.method.num_vectors and base model"
                )
            with torch.no_grad():
                embedding.vectors.copy_(vectors)
        self._clear_caches()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The placeholder reads its initial rows (the initializer word, or the random start)."""
        embeddings = self._require_attached()
        for embedding in embeddings:
            embedding.enabled = False
        self._clear_caches()
        try:
            yield
        finally:
            for embedding in embeddings:
                embedding.enabled = True
            self._clear_caches()

    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        path = Path(path)
        path = path if path.suffix == self.export_suffix else path.with_suffix(self.export_suffix)
        meta = {
            **metadata,
            "ldm_method": "textual_inversion",
            "ldm_num_vectors": self.num_vectors,
            "ldm_initializer_word": self.initializer_word or "",
        }
        embeddings = self._require_attached()
        if len(embeddings) > 1:  # SDXL: {"clip_l": ..., "clip_g": ...}
            return save_sdxl_embedding(path, [e.vectors for e in embeddings], self.placeholder, meta)
        return save_embedding(path, embeddings[0].vectors, self.placeholder, self.export_format, meta)
