"""Architecture presets of the released Stable Diffusion models, and telling an architecture's version.

A preset holds the ``UNetModel`` and ``AutoencoderKL`` kwargs, the text encoder's ``CLIPTextConfig``
fields, the beta schedule, the parameterization, the latent scale factor and the native resolution.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ldm.diffusion.discretization import SD_CONVENTION
from ldm.modules.clip_presets import PRESETS as TEXT_PRESETS
from ldm.utils.plain import to_plain

__all__ = [
    "DEFAULT_TOKENIZERS",
    "PRESETS",
    "SD_SCHEDULE",
    "STANDARD_CLIP_VOCAB",
    "TEXT_CONFIG_FIELDS",
    "resolve_preset",
    "version_of",
]

STANDARD_CLIP_VOCAB = 49408

_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attention_resolutions": [4, 2, 1],
    "transformer_depth": 1,
    "use_checkpoint": False,
    "dropout": 0.0,
    "use_scale_shift_norm": False,
}


_SD_VAE = {
    "embed_dim": 4,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "resolution": 256,
    "norm_groups": 32,
}


# SD files are sampled with CompVis' / AUTOMATIC1111's / the released diffusers configs' timestep conventions
SD_SCHEDULE = {
    "kind": "scaled_linear",
    "num_timesteps": 1000,
    "linear_start": 0.00085,
    "linear_end": 0.012,
    **SD_CONVENTION.as_config(),
}


# Architecture + diffusion settings of the released models. "text_encoder" is a CLIPTextConfig dict.
PRESETS: dict[str, dict[str, Any]] = {
    # SD v1.x (1.1-1.5): CLIP ViT-L/14 last hidden state, 8 heads, 1x1-conv proj, eps, 512 px.
    "v1": {
        "version": "v1",
        "unet": {
            **_SD_UNET,
            "num_heads": 8,
            "num_head_channels": -1,
            "context_dim": 768,
            "use_linear_in_transformer": False,
        },
        "vae": _SD_VAE,
        "text_encoder": TEXT_PRESETS["vit_l_14"],
        "schedule": SD_SCHEDULE,
        "parameterization": "eps",
        "scale_factor": 0.18215,
        "resolution": 512,
    },
    # SD 2.x 512-base: OpenCLIP ViT-H/14 penultimate layer (23-layer HF layout), 64-wide heads, linear proj.
    "v2": {
        "version": "v2",
        "unet": {
            **_SD_UNET,
            "num_heads": -1,
            "num_head_channels": 64,
            "context_dim": 1024,
            "use_linear_in_transformer": True,
        },
        "vae": _SD_VAE,
        "text_encoder": TEXT_PRESETS["vit_h_14"],
        "schedule": SD_SCHEDULE,
        "parameterization": "eps",
        "scale_factor": 0.18215,
        "resolution": 512,
    },
}


# SD 2.x 768-v (2.0-v, 2.1): same weights layout, v-prediction at 768 px.
PRESETS["v2-v"] = {**PRESETS["v2"], "parameterization": "v", "resolution": 768}


# SDXL base 1.0 (sgm's sd_xl_base.yaml = conf/model/unet/sdxl.yaml + conf/model/conditioner/sdxl.yaml): CLIP-L
# and OpenCLIP bigG (with its projection: the pooled vector), both at the penultimate layer without the final
# layer norm; the same kl-f8 VAE architecture with scale 0.13025; eps at 1024 px; SD's schedule (leading, +1).
_SDXL_TEXT_OPTIONS = {"layer": "penultimate", "final_layer_norm": False}
PRESETS["sdxl"] = {
    "version": "sdxl",
    "unet": {
        **_SD_UNET,
        "channel_mult": [1, 2, 4],
        "attention_resolutions": [4, 2],
        "num_heads": -1,
        "num_head_channels": 64,
        "transformer_depth": [0, 2, 10],
        "context_dim": 2048,
        "adm_in_channels": 2816,
        "use_linear_in_transformer": True,
    },
    "vae": _SD_VAE,
    "text_encoder": {**TEXT_PRESETS["vit_l_14_sdxl"], **_SDXL_TEXT_OPTIONS},
    "text_encoder_2": {**TEXT_PRESETS["vit_bigg_14"], **_SDXL_TEXT_OPTIONS},
    "schedule": SD_SCHEDULE,
    "parameterization": "eps",
    "scale_factor": 0.13025,
    "resolution": 1024,
}


# SDXL refiner 1.0 (sgm's sd_xl_refiner.yaml = conf/model/unet/sdxl_refiner.yaml): OpenCLIP bigG alone
# (penultimate, no final layer norm; pooled + projected), context 1280; y = pooled 1280 + Fourier features of
# original size, crop and aesthetic score (5 x 256) = 2560. "refiner": True makes the loaders build it so.
PRESETS["sdxl_refiner"] = {
    "version": "sdxl_refiner",
    "refiner": True,
    "unet": {
        **_SD_UNET,
        "model_channels": 384,
        "attention_resolutions": [4, 2],
        "num_heads": -1,
        "num_head_channels": 64,
        "transformer_depth": [0, 4, 4, 0],
        "transformer_depth_middle": 4,
        "context_dim": 1280,
        "adm_in_channels": 2560,
        "use_linear_in_transformer": True,
    },
    "vae": _SD_VAE,
    "text_encoder": {**TEXT_PRESETS["vit_bigg_14"], **_SDXL_TEXT_OPTIONS},
    "schedule": SD_SCHEDULE,
    "parameterization": "eps",
    "scale_factor": 0.13025,
    "resolution": 1024,
}


# Where the tokenizer of a single file comes from when none is given (hub cache or download).
DEFAULT_TOKENIZERS = {
    "v1": ("openai/clip-vit-large-patch14", ""),
    "v2": ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
    "sdxl_refiner": ("stabilityai/stable-diffusion-xl-refiner-1.0", "tokenizer_2"),
}


TEXT_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "projection_dim",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def resolve_preset(preset: str | Mapping | None = None, **overrides: Any) -> dict[str, Any]:
    """A preset (name or dict) with ``overrides`` applied: ``unet``/``vae``/``text_encoder``/``schedule``
    dicts update the preset's dicts key by key; scalars (parameterization, scale_factor, resolution)
    replace."""
    if preset is None:
        base: dict[str, Any] = copy.deepcopy(PRESETS["v1"])
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown Stable Diffusion preset {preset!r}; choose from {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[preset])
    else:
        base = copy.deepcopy(dict(preset))
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("unet", "vae", "text_encoder", "text_encoder_2", "schedule"):
            if isinstance(value, str) and key.startswith("text_encoder"):
                value = TEXT_PRESETS[value]
            base[key] = {**base.get(key, {}), **to_plain(value)}
        elif key in ("parameterization", "scale_factor", "resolution", "version"):
            base[key] = value
        else:
            raise TypeError(f"unknown preset override {key!r}")
    return base


def version_of(unet_config: Mapping[str, Any], text_config: Mapping[str, Any] | None = None) -> str:
    """``"v1"``/``"v2"``/``"sdxl"``/``"sdxl_refiner"`` when the architecture is that of the released models,
    else ``"custom"``."""
    config = {
        **unet_config,
        "attention_resolutions": sorted(unet_config.get("attention_resolutions", ()), reverse=True),
    }
    for version in ("v1", "v2", "sdxl", "sdxl_refiner"):
        preset = PRESETS[version]
        keys = (set(preset["unet"]) | {"adm_in_channels"}) - {"use_checkpoint", "dropout"}
        if all(_same(config.get(k), preset["unet"].get(k)) for k in keys) and (
            text_config is None
            or int(text_config.get("hidden_size", 0)) == preset["text_encoder"]["hidden_size"]
        ):
            return version
    return "custom"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        sequences = isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
        return sequences and list(a) == list(b)
    return a == b
