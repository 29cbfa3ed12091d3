"""CLIP text tower architectures: the presets of the released Stable Diffusion text encoders, and building
an (untrained, optionally meta-device) ``CLIPTextModel`` from a preset, a dict or a ``CLIPTextConfig``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.modules.clip_layout import sd_layout

__all__ = ["PRESETS", "build_config", "build_text_model"]

# Architecture presets (text tower only; no weights).
PRESETS: dict[str, dict[str, Any]] = {
    # SD v1.x: OpenAI CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), last hidden state.
    "vit_l_14": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
    # SD 2.x: OpenCLIP ViT-H/14 text tower in the diffusers layout, which keeps 23 of the 24 layers
    # (SD2 conditions on the penultimate layer), so use it with layer="last".
    "vit_h_14": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1024,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,  # OpenCLIP pads with "!" (id 0)
    },
    # SDXL's first encoder: the same ViT-L/14 tower, used at its penultimate layer without final_layer_norm.
    "vit_l_14_sdxl": {},  # filled below: = vit_l_14
    # SDXL's second encoder: OpenCLIP ViT-bigG/14 text tower, all 32 layers, with its text projection
    # (the HF CLIPTextModelWithProjection layout of diffusers' text_encoder_2/): penultimate layer + pooled.
    "vit_bigg_14": {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1280,
        # as SDXL's text_encoder_2/config.json: eos_token_id 2 makes HF pool at argmax(input_ids),
        # OpenCLIP's rule
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
}
PRESETS["vit_l_14_sdxl"] = dict(PRESETS["vit_l_14"])


def build_config(config: str | dict | CLIPTextConfig) -> CLIPTextConfig:
    if isinstance(config, CLIPTextConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown text encoder preset {config!r}; choose from {sorted(PRESETS)}")
        return CLIPTextConfig(**PRESETS[config])
    return CLIPTextConfig(**dict(config))


def build_text_model(
    config: str | dict | CLIPTextConfig,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    with_projection: bool = False,
) -> CLIPTextModel:
    """A ``CLIPTextModel`` of architecture ``config`` with transformers' random init (the global RNG is left
    alone), or unallocated with ``device="meta"``; the ``position_ids`` buffer (not in checkpoints) is
    still made real on CPU, so ``load_state_dict(sd, assign=True)`` yields a usable module.
    ``with_projection``: a ``CLIPTextModelWithProjection`` (``text_projection``, no bias; SDXL's bigG)."""
    text_config = build_config(config)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        if device is not None:
            with torch.device(device):
                model = model_class(text_config)
        else:
            model = model_class(text_config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    embeddings = sd_layout(model).text_model.embeddings
    if embeddings.position_ids.is_meta:
        embeddings.position_ids = torch.arange(text_config.max_position_embeddings).expand((1, -1))
    return model
