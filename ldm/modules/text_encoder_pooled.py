"""SDXL's second text embedder: a CLIP text tower with its projection, giving the context AND a pooled vector.

``PooledCLIPTextEncoder`` is a ``CLIPTextEncoder`` whose transformer is a transformers
``CLIPTextModelWithProjection`` (parameters ``transformer.text_model.*`` and
``transformer.text_projection.weight``, no bias: diffusers' ``text_encoder_2/`` keys under ``transformer.``,
one to one). Prompts ->

* ``"crossattn"``: the hidden state ``layer`` names (SDXL: ``"penultimate"``, ``final_layer_norm=False``), and
* ``"vector"``: the pooled, projected text: the final-layer-normed last hidden state at the end token
  (HF's rule: ``argmax(input_ids)`` when the config's ``eos_token_id`` is 2, as in SDXL's released config and
  OpenCLIP; else the first ``eos_token_id``) times ``text_projection`` -- HF's ``text_embeds``.

The conditioner concatenates the contexts of all text embedders along features and the vectors likewise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.modules.clip_presets import build_text_model
from ldm.modules.text_encoder import CLIPTextEncoder

__all__ = ["PooledCLIPTextEncoder"]


class PooledCLIPTextEncoder(CLIPTextEncoder):
    """Prompts -> ``{"crossattn": [B, L, hidden], "vector": [B, projection_dim]}`` (see the module
    docstring)."""

    def __init__(self, transformer, tokenizer, **kwargs: Any):
        if not hasattr(transformer, "text_projection"):
            raise ValueError(
                f"PooledCLIPTextEncoder needs a CLIPTextModelWithProjection, got "
                f"{type(transformer).__name__} (no text_projection)"
            )
        super().__init__(transformer, tokenizer, **kwargs)

    @property
    def projection_dim(self) -> int:
        return int(self.transformer.text_projection.out_features)

    def encode_ids(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.transformer(input_ids=input_ids.to(self.device, torch.long), output_hidden_states=True)
        return {"crossattn": self.hidden_of(outputs), "vector": outputs.text_embeds}

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
    ) -> PooledCLIPTextEncoder:
        """``CLIPTextEncoder.tiny`` with a text projection (``projection_dim``, default ``hidden_size``)."""
        return super().tiny(
            vocab_words,
            hidden_size,
            num_layers,
            num_heads,
            max_length,
            seed,
            cache_dir,
            intermediate_size,
            projection_dim=projection_dim or hidden_size,
            **encoder_kwargs,
        )

    @classmethod
    def from_config(
        cls,
        config: str | dict | CLIPTextConfig = "vit_bigg_14",
        tokenizer_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **encoder_kwargs: Any,
    ) -> PooledCLIPTextEncoder:
        """Architecture only (``CLIPTextEncoder.from_config`` with the projection; default SDXL's bigG)."""
        model = build_text_model(config, device, dtype, with_projection=True)
        tokenizer = None
        if tokenizer_path is not None:
            tokenizer = CLIPTokenizer.from_pretrained(
                os.fspath(tokenizer_path),
                local_files_only=True,
                model_max_length=model.config.max_position_embeddings,
            )
        return cls(model, tokenizer, **encoder_kwargs)
