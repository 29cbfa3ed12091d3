"""The transformers-version shim: parameter names ``text_model.*`` on every transformers version.

transformers 4 ``CLIPTextModel`` nests the network under ``.text_model``; transformers 5 dropped that level,
so there ``sd_layout`` wraps it in a ``CLIPTextModelHolder`` whose ``.text_model`` is the ``CLIPTextModel``.
Either way the result's ``.text_model`` holds ``embeddings``, ``encoder`` and ``final_layer_norm``, and
calling it, ``.config`` and ``.save_pretrained`` behave like the HF model, so Stable Diffusion v1
``cond_stage_model.transformer.text_model.*`` keys load by prefix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.utils.files import atomic_save_safetensors

__all__ = ["CLIPTextModelHolder", "sd_layout"]


class CLIPTextModelHolder(nn.Module):
    """Puts a transformers-5 ``CLIPTextModel`` under ``.text_model`` so parameter names read
    ``text_model.embeddings...`` as in SD v1 checkpoints and transformers 4. Forwards calls to it."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_model(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """HF ``save_pretrained``, with the weights file rewritten under ``text_model.*`` names: the
        layout of released CLIP / diffusers folders, which transformers 4 needs and 5 also reads."""
        self.text_model.save_pretrained(save_directory, **kwargs)
        weights = Path(save_directory) / "model.safetensors"
        if weights.is_file():  # single-file save (sharded saves are left as transformers wrote them)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            atomic_save_safetensors(state, weights, metadata={"format": "pt"})


def sd_layout(model: CLIPTextModel) -> nn.Module:
    """``model`` itself when it already nests ``text_model`` (transformers 4), else a holder."""
    return model if isinstance(getattr(model, "text_model", None), nn.Module) else CLIPTextModelHolder(model)
