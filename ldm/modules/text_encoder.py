"""Frozen CLIP text encoder: the conditioning model of Stable Diffusion, plus a tiny offline preset.

``CLIPTextEncoder`` wraps a transformers ``CLIPTextModel`` and ``CLIPTokenizer``:

    prompts: list[str] -> tokenize -> input_ids LongTensor [B, L] -> encode_ids -> context [B, L, D]

and the context enters every UNet cross-attention as K and V (L = 77, D = 768 for SD v1).

Parameter names follow the Stable Diffusion v1 / transformers-4 layout on every transformers version:
``encoder.transformer.text_model.embeddings.token_embedding.weight`` ... so a SD v1 checkpoint's
``cond_stage_model.transformer.text_model.*`` keys load by prefix into ``cond_stage_model.`` (and kohya
``lora_te_text_model_*`` names map onto module paths). transformers 4 ``CLIPTextModel`` already nests the
network under ``.text_model``; transformers 5 dropped that level, so there ``self.transformer`` is a
``CLIPTextModelHolder`` (``clip_layout``) whose ``.text_model`` is the ``CLIPTextModel``. Either way
``self.transformer.text_model`` holds ``embeddings``, ``encoder`` and ``final_layer_norm``, and
``self.transformer(input_ids=...)``, ``.config`` and ``.save_pretrained`` behave like the HF model.

Construction routes (all usable as a Hydra ``_target_``):

* ``CLIPTextEncoder.tiny(...)``: fully offline, deterministic; writes a small byte-level CLIP BPE
  tokenizer (``vocab.json`` + ``merges.txt``) whose whole-word tokens cover the embedded shapes
  dataset, and builds a randomly initialised ``CLIPTextModel`` from a fixed seed (``tiny_clip``).
* ``CLIPTextEncoder.from_pretrained(path)``: a local diffusers folder (``text_encoder/`` +
  ``tokenizer/``), a plain HF CLIP folder, or a hub id (offline-aware, clear error when unreachable;
  ``text_encoder_files``).
* ``CLIPTextEncoder.from_config("vit_l_14")``: architecture only (SD v1 shape), meta-device friendly,
  for checkpoint loaders that fill the weights from a Stable Diffusion file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.adapters.token_embeddings import expand_placeholders
from ldm.modules.clip_layout import CLIPTextModelHolder, sd_layout
from ldm.modules.clip_presets import PRESETS, build_text_model
from ldm.modules.text_encoder_files import load_clip_files, save_tokenizer
from ldm.modules.text_encoder_tokens import PlaceholderTokens
from ldm.modules.tiny_clip import (
    TINY_DATASET_WORDS,
    TINY_PROMPT_WORDS,
    tiny_clip_model,
    tiny_clip_tokenizer,
    write_tiny_clip_tokenizer,
)

__all__ = [
    "PRESETS",
    "TINY_DATASET_WORDS",
    "TINY_PROMPT_WORDS",
    "CLIPTextEncoder",
    "CLIPTextModelHolder",
    "write_tiny_clip_tokenizer",
]


class CLIPTextEncoder(PlaceholderTokens, nn.Module):
    """Prompts -> CLIP token hidden states ``[B, max_length, hidden]`` (the cross-attention context).

    Args:
        transformer: a ``CLIPTextModel`` (wrapped to the SD v1 ``text_model.*`` layout if needed).
        tokenizer: its ``CLIPTokenizer``; may be None for a weights-only model (``from_config``), in
            which case only ``encode_ids`` works until ``self.tokenizer`` is set.
        max_length: tokens per prompt; default ``min(tokenizer.model_max_length,
            max_position_embeddings)`` (77 for real CLIP).
        layer: which hidden state to return:
            ``"last"`` -- ``last_hidden_state``, i.e. the last layer *after* ``final_layer_norm``
            (SD v1, and SD2 in the diffusers layout whose encoder already stops one layer early);
            ``"penultimate"`` -- the output of the second-to-last layer (SD2 / "clip skip 2");
            an ``int`` -- index into ``hidden_states`` (0 = embeddings, i = after layer i, -k counts
            from the end; A1111 "clip skip k" is ``-k``).
        final_layer_norm: apply ``final_layer_norm`` to a non-last layer (what SD2's OpenCLIP embedder,
            A1111 clip skip and diffusers ``clip_skip`` do). SDXL-style raw hidden states: False.
        freeze: no parameter requires grad and the module stays in eval mode through ``.train()``.
        cache_size: most prompts ``encode_cached`` keeps (least recently used are dropped); None = no limit.
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: CLIPTokenizer | None,
        max_length: int | None = None,
        layer: str | int = "last",
        final_layer_norm: bool = True,
        freeze: bool = True,
        cache_size: int | None = 4096,
    ):
        super().__init__()
        self.transformer = sd_layout(transformer) if isinstance(transformer, CLIPTextModel) else transformer
        self.tokenizer = tokenizer
        positions = self.transformer.config.max_position_embeddings
        if max_length is None:
            tok_max = (
                getattr(tokenizer, "model_max_length", positions) if tokenizer is not None else positions
            )
            max_length = min(int(tok_max), positions)
        if not 2 <= max_length <= positions:
            raise ValueError(f"max_length={max_length} must be in [2, max_position_embeddings={positions}]")
        self.max_length = int(max_length)
        if isinstance(layer, str) and layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last', 'penultimate' or an int, got {layer!r}")
        self.layer = layer
        self.final_layer_norm = final_layer_norm
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, torch.dtype], torch.Tensor] = OrderedDict()
        self.placeholders: dict[str, list[str]] = {}  # multi-vector token -> the tokens it expands to
        self._frozen = False
        if freeze:
            self.freeze()
        # Weights loaded by load_state_dict (ours or a parent's) make cached embeddings stale.
        self.register_load_state_dict_post_hook(_clear_cache_after_load)

    # ---------------------------------------------------------------- properties and freezing

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> CLIPTextEncoder:
        """Stop gradients to every parameter and keep eval mode (dropout off) from now on."""
        self._frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> CLIPTextEncoder:
        """Make every parameter trainable again; ``.train()`` then behaves normally."""
        self._frozen = False
        self.requires_grad_(True)
        self.clear_cache()
        return self

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(mode and not self._frozen)

    # ---------------------------------------------------------------- encoding

    def _require_tokenizer(self) -> CLIPTokenizer:
        if self.tokenizer is None:
            raise RuntimeError(
                "this CLIPTextEncoder has no tokenizer (built from a config without tokenizer_path); "
                "set `encoder.tokenizer` or call encode_ids() with token ids"
            )
        return self.tokenizer

    @staticmethod
    def _as_list(prompts: str | Sequence[str]) -> list[str]:
        return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> input_ids LongTensor ``[B, max_length]`` on CPU: ``<|startoftext|>``, tokens,
        ``<|endoftext|>``, then pad tokens; prompts longer than ``max_length - 2`` tokens are truncated
        (the end token is kept). Placeholders of ``add_placeholder`` expand to their tokens first."""
        prompts = [expand_placeholders(p, self.placeholders) for p in self._as_list(prompts)]
        batch = self._require_tokenizer()(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_tensors="pt",
        )
        return batch["input_ids"].long()

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``[B, L]`` -> hidden states ``[B, L, hidden]`` on the module's device. No attention
        mask, as in Stable Diffusion: the causal mask already hides the pads from earlier tokens."""
        input_ids = input_ids.to(self.device, torch.long)
        if self.layer == "last":
            return self.transformer(input_ids=input_ids).last_hidden_state
        return self.hidden_of(self.transformer(input_ids=input_ids, output_hidden_states=True))

    def hidden_of(self, outputs: Any) -> torch.Tensor:
        """The hidden state ``layer`` names from HF outputs that hold ``hidden_states`` (non-last layers)."""
        if self.layer == "last":
            return outputs.last_hidden_state
        hidden = outputs.hidden_states[-2 if self.layer == "penultimate" else int(self.layer)]
        if self.final_layer_norm:
            hidden = self.transformer.text_model.final_layer_norm(hidden)
        return hidden

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts (B strings) -> context ``[B, max_length, hidden]``."""
        return self.encode_ids(self.tokenize(prompts))

    # ---------------------------------------------------------------- cache

    @property
    def cache_enabled(self) -> bool:
        """Caching is sound only while the weights cannot change: frozen and nothing requires grad
        (e.g. textual inversion re-enabling the token embedding turns the cache off)."""
        return self._frozen and not any(p.requires_grad for p in self.parameters())

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode_cached(
        self, prompts: str | Sequence[str], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``forward`` with per-prompt memoisation while frozen (plain ``forward`` otherwise).

        Entries are keyed by ``(prompt, dtype)`` and stored detached on CPU (so GPU memory does not
        grow with the number of distinct prompts, and a device move never leaves stale devices behind);
        the result is moved to ``device`` (default: the module's current device; a model whose encoder was
        offloaded asks for its own). Misses are encoded in one batch.
        ``clear_cache()`` after changing weights in place (``load_state_dict`` and ``add_tokens`` clear it).
        """
        prompts = self._as_list(prompts)
        if not self.cache_enabled:
            return _tree(self(prompts), lambda t: t.to(device or self.device))
        dtype = self.dtype
        missing = list(OrderedDict.fromkeys(p for p in prompts if (p, dtype) not in self._cache))
        if missing:
            with torch.no_grad():
                encoded = _tree(self(missing), lambda t: t.detach().to("cpu"))
            for i, prompt in enumerate(missing):  # a tensor, or a dict of them (a pooled encoder)
                self._cache[(prompt, dtype)] = _tree(encoded, lambda t, i=i: t[i].clone())
        rows = []
        for prompt in prompts:
            self._cache.move_to_end((prompt, dtype))
            rows.append(self._cache[(prompt, dtype)])
        if isinstance(rows[0], dict):
            result = {k: torch.stack([r[k] for r in rows]).to(device or self.device) for k in rows[0]}
        else:
            result = torch.stack(rows).to(device or self.device)
        if self.cache_size is not None:
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    # ---------------------------------------------------------------- construction

    @classmethod
    def tiny(
        cls,
        vocab_words: Sequence[str] | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 20,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        intermediate_size: int | None = None,
        projection_dim: int | None = None,
        **encoder_kwargs: Any,
    ) -> CLIPTextEncoder:
        """A small randomly initialised CLIP text encoder, fully offline and deterministic.

        The tokenizer covers every byte (any text tokenizes) and has one ``word</w>`` token per word
        of ``vocab_words`` (default: ``TINY_DATASET_WORDS + TINY_PROMPT_WORDS``). Its files go to
        ``cache_dir/<hash of the words>`` (default ``$LDM_CACHE_DIR`` or ``<tmp>/ldm-cache``,
        then ``tiny-clip-tokenizer/``), written once and reused. Weights are drawn from a
        ``torch.Generator`` seeded with ``seed`` in a fixed parameter order (the global RNG is left
        alone), so the same arguments give the same weights and embeddings on every machine.
        ``max_length`` (default 20) is also the number of position embeddings. ``projection_dim``: a
        ``CLIPTextModelWithProjection`` (the pooled encoder's layout).
        """
        tokenizer, _ = tiny_clip_tokenizer(vocab_words, max_length, cache_dir)
        model = tiny_clip_model(
            tokenizer,
            hidden_size,
            num_layers,
            num_heads,
            max_length,
            seed,
            intermediate_size,
            projection_dim=projection_dim,
        )
        return cls(model, tokenizer, max_length=max_length, **encoder_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        hub_cache_dir: str | os.PathLike | None = None,
        **encoder_kwargs: Any,
    ) -> CLIPTextEncoder:
        """Load weights + tokenizer from a local folder or a Hugging Face Hub id.

        Local folders: a diffusers model folder (``text_encoder/`` + ``tokenizer/`` are found by
        themselves), or a plain CLIP folder (``config.json``, weights, tokenizer files; a full
        ``CLIPModel`` folder such as clip-vit-large-patch14 works, its vision tower is ignored).
        Hub ids: pass ``subfolder="text_encoder"`` for a diffusers repo (the tokenizer then comes
        from ``tokenizer/``). ``local_files_only`` defaults to True when ``HF_HUB_OFFLINE=1`` (then
        only the local HF cache is used); a failure raises an OSError saying what to do.
        ``dtype`` casts after loading; other keywords go to the constructor (layer, max_length...).
        """
        model, tokenizer = load_clip_files(
            path, subfolder, tokenizer_subfolder, local_files_only, revision, hub_cache_dir
        )
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return cls(model, tokenizer, **encoder_kwargs)

    @classmethod
    def from_config(
        cls,
        config: str | dict | CLIPTextConfig = "vit_l_14",
        tokenizer_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **encoder_kwargs: Any,
    ) -> CLIPTextEncoder:
        """Architecture only (weights are transformers' random init, or unallocated on ``meta``).

        ``config``: a preset name (``"vit_l_14"`` = SD v1 ViT-L/14: hidden 768, 12 layers, 12 heads,
        MLP 3072, 77 positions, vocab 49408, quick_gelu; ``"vit_h_14"`` = SD2 diffusers shape), a dict
        of ``CLIPTextConfig`` fields, or a ``CLIPTextConfig``. With ``device="meta"`` no memory is
        allocated; the ``position_ids`` buffer (not in checkpoints) is still made real on CPU, so
        ``load_state_dict(sd, assign=True)`` yields a usable module. ``tokenizer_path``: local folder
        with the tokenizer files (without it the encoder has no tokenizer; see ``encode_ids``).
        """
        model = build_text_model(config, device, dtype)
        tokenizer = None
        if tokenizer_path is not None:
            tokenizer = CLIPTokenizer.from_pretrained(
                os.fspath(tokenizer_path),
                model_max_length=model.config.max_position_embeddings,
                local_files_only=True,
            )
        return cls(model, tokenizer, **encoder_kwargs)

    def save_pretrained(self, path: str | os.PathLike, layout: str = "diffusers") -> Path:
        """Write weights + tokenizer: ``layout="diffusers"`` -> ``path/text_encoder`` + ``path/tokenizer``;
        ``"plain"`` -> both in ``path``. Either loads back with ``from_pretrained(path)``."""
        if layout not in ("diffusers", "plain"):
            raise ValueError(f"layout must be 'diffusers' or 'plain', got {layout!r}")
        path = Path(path)
        model_dir = path / "text_encoder" if layout == "diffusers" else path
        tokenizer_dir = path / "tokenizer" if layout == "diffusers" else path
        self.transformer.save_pretrained(str(model_dir))
        tokenizer = self._require_tokenizer()
        tokenizer.model_max_length = self.max_length
        save_tokenizer(tokenizer, tokenizer_dir)
        return path

    def extra_repr(self) -> str:
        return f"max_length={self.max_length}, layer={self.layer!r}, frozen={self._frozen}"


def _tree(value: Any, fn) -> Any:
    """``fn`` on a tensor, or on each tensor of a dict."""
    return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


def _clear_cache_after_load(module: CLIPTextEncoder, incompatible_keys: Any) -> None:
    module.clear_cache()  # a module-level function, so the encoder stays picklable
