"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learn the embedding of a new
placeholder token (``num_vectors`` consecutive tokens) so that prompts with it produce the concept; the whole
model, every other token row included, stays frozen. Exports the files AUTOMATIC1111, ComfyUI and diffusers
read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ldm.io.embeddings import EMBEDDING_FORMATS, EMBEDDING_SUFFIXES, save_embedding
from ldm.models.finetune.method import FineTuneMethod, check_state_keys
from ldm.modules.adapters.token_embeddings import PlaceholderEmbedding

if TYPE_CHECKING:
    from ldm.models.finetune.module import FineTuneModule

STATE_KEY = "placeholder_vectors"


class TextualInversion(FineTuneMethod):
    """placeholder: the token to write in prompts (e.g. ``<star>``); num_vectors: embedding vectors it stands
    for; initializer_word: text whose token embeddings start the vectors (cycled), None = random;
    export_format: ``a1111`` (``{"emb_params": [n, dim]}`` .safetensors), ``diffusers`` (``{placeholder: [n,
    dim]}``) or ``a1111_pt`` (AUTOMATIC1111's ``.pt``); AUTOMATIC1111 names the token after the file;
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
        self.embedding: PlaceholderEmbedding | None = None

    def attach(self, model: FineTuneModule) -> None:
        encoder = model.text_encoder
        if not hasattr(encoder, "add_placeholder"):
            raise TypeError(f"textual inversion needs a CLIPTextEncoder, got {type(encoder).__name__}")
        ids = encoder.add_placeholder(self.placeholder, self.num_vectors, init_text=self.initializer_word)
        self.embedding = PlaceholderEmbedding(encoder.token_embedding, ids)
        encoder.transformer.text_model.embeddings.token_embedding = self.embedding
        encoder.clear_cache()
        self.model = model

    def _require_attached(self) -> PlaceholderEmbedding:
        if self.embedding is None:
            raise RuntimeError("TextualInversion is not attached to a model yet (attach(model) first)")
        return self.embedding

    def parameters(self) -> list[nn.Parameter]:
        return [self._require_attached().vectors]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.parameters(), "weight_decay": self.weight_decay}]

    def state_dict(self) -> dict[str, Tensor]:
        return {STATE_KEY: self._require_attached().vectors.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        embedding = self._require_attached()
        check_state_keys({STATE_KEY}, state, "textual inversion")
        vectors = state[STATE_KEY]
        if vectors.shape != embedding.vectors.shape:
            raise ValueError(
                f"textual inversion: checkpoint vectors have shape {tuple(vectors.shape)}, this run "
                f"needs {tuple(embedding.vectors.shape)} (num_vectors x hidden size); resume with the "
                "same model.method.num_vectors and base model"
            )
        with torch.no_grad():
            embedding.vectors.copy_(vectors)
        self.model.text_encoder.clear_cache()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The placeholder reads its initial rows (the initializer word, or the random start)."""
        embedding = self._require_attached()
        embedding.enabled = False
        self.model.text_encoder.clear_cache()
        try:
            yield
        finally:
            embedding.enabled = True
            self.model.text_encoder.clear_cache()

    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        path = Path(path)
        path = path if path.suffix == self.export_suffix else path.with_suffix(self.export_suffix)
        meta = {
            **metadata,
            "ldm_method": "textual_inversion",
            "ldm_num_vectors": self.num_vectors,
            "ldm_initializer_word": self.initializer_word or "",
        }
        return save_embedding(
            path, self._require_attached().vectors, self.placeholder, self.export_format, meta
        )
