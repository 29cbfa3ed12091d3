"""Write loaded components as a diffusers model folder (``StableDiffusionPipeline`` or, with a second text
encoder, ``StableDiffusionXLPipeline``), the inverse of ``ldm.io.diffusers_folder``.

The folder holds ``model_index.json``; ``unet/`` and ``vae/`` (``config.json`` and
``diffusion_pytorch_model.safetensors``, renamed by ``ldm.io.diffusers_names``); ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/`` as transformers writes them; and
``scheduler/scheduler_config.json`` from the schedule, its timestep convention and the parameterization
(SDXL: ``EulerDiscreteScheduler``, SD 1.x/2.x: ``DDIMScheduler``). It is written into a temporary sibling
folder and renamed into place at the end, so an interrupted export leaves no half folder; an existing
non-empty folder is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ldm.diffusion import as_parameterization
from ldm.io.components import SDComponents, as_dtype
from ldm.io.describe import describe_schedule, describe_unet, describe_vae
from ldm.io.diffusers_config import diffusers_config_from_ldm
from ldm.io.diffusers_names import ldm_unet_to_diffusers, ldm_vae_to_diffusers
from ldm.modules.text_encoder_files import save_tokenizer
from ldm.utils.files import atomic_save_safetensors, atomic_write_text
from ldm.utils.logging import get_logger

__all__ = ["export_diffusers_folder"]

log = get_logger(__name__)

_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_BETA_SCHEDULE = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def export_diffusers_folder(
    components: SDComponents, folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32
) -> Path:
    """Write ``components`` as a diffusers folder at ``folder`` (see the module docstring); floating tensors
    of the UNet and VAE are cast to ``dtype`` (default float32), the text encoders are saved as they are."""
    folder = Path(folder)
    if components.refiner:
        raise ValueError(
            "the SDXL refiner is written as a single file only (scripts/convert.py without --diffusers, or "
            "export_components); its diffusers folder is the released stable-diffusion-xl-refiner-1.0"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder: pick a new output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_all(components, staging, as_dtype(dtype))
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(f"wrote the diffusers folder {folder}")
    return folder


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _weights(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }


def _write_all(components: SDComponents, root: Path, dtype: torch.dtype) -> None:
    xl = components.text_encoder_2 is not None
    unet_config = unet_diffusers_config(components)
    _write_json(root / "unet" / "config.json", unet_config)
    unet_state = ldm_unet_to_diffusers(components.unet.state_dict(), components.unet)
    atomic_save_safetensors(
        _weights(unet_state, dtype), root / "unet" / "diffusion_pytorch_model.safetensors"
    )
    _write_json(root / "vae" / "config.json", vae_diffusers_config(components))
    vae_state = ldm_vae_to_diffusers(components.vae.state_dict())
    atomic_save_safetensors(_weights(vae_state, dtype), root / "vae" / "diffusion_pytorch_model.safetensors")
    names = ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")
    for text_encoder, (model_dir, tokenizer_dir) in zip(components.text_encoders, names):
        text_encoder.transformer.save_pretrained(str(root / model_dir))
        if getattr(text_encoder, "tokenizer", None) is None:
            raise ValueError(f"the {model_dir} has no tokenizer to write into {tokenizer_dir}/")
        save_tokenizer(text_encoder.tokenizer, root / tokenizer_dir)
    scheduler = scheduler_diffusers_config(components)
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(root / "model_index.json", _model_index(xl, scheduler["_class_name"]))


def unet_diffusers_config(components: SDComponents) -> dict[str, Any]:
    """``unet/config.json``: the architecture, the SDXL size features' width, ``sample_size`` in latents."""
    described = describe_unet(components.unet)
    extra = {}
    if components.text_encoder_2 is not None:
        pooled = int(components.text_encoder_2.transformer.text_projection.out_features)
        extra["addition_time_embed_dim"] = (int(described["adm_in_channels"]) - pooled) // 6
    config = diffusers_config_from_ldm(**described, **extra)
    factor = 2 ** (len(describe_vae(components.vae)["ch_mult"]) - 1)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return {"_class_name": "UNet2DConditionModel", **config, "sample_size": components.resolution // factor}


def vae_diffusers_config(components: SDComponents) -> dict[str, Any]:
    vae = describe_vae(components.vae)
    levels = len(vae["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": vae["in_channels"],
        "out_channels": vae["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [vae["ch"] * m for m in vae["ch_mult"]],
        "layers_per_block": vae["num_res_blocks"],
        "latent_channels": vae["z_channels"],
        "norm_num_groups": vae["norm_groups"],
        "act_fn": "silu",
        "sample_size": components.resolution,
        "scaling_factor": float(components.scale_factor),
        "force_upcast": components.text_encoder_2 is not None,  # SDXL's VAE overflows in fp16
    }


def scheduler_diffusers_config(components: SDComponents) -> dict[str, Any]:
    """``scheduler/scheduler_config.json``: the betas (named or trained), the timestep convention and the
    prediction type; ``EulerDiscreteScheduler`` for SDXL (its released scheduler), else ``DDIMScheduler``."""
    schedule = describe_schedule(components.schedule)
    if "betas" in schedule:
        betas: dict[str, Any] = {
            "trained_betas": schedule["betas"],
            "num_train_timesteps": len(schedule["betas"]),
        }
    else:
        betas = {
            "beta_schedule": _BETA_SCHEDULE[schedule["kind"]],
            "beta_start": float(schedule["linear_start"]),
            "beta_end": float(schedule["linear_end"]),
            "num_train_timesteps": int(schedule["num_timesteps"]),
        }
    xl = components.text_encoder_2 is not None
    return {
        "_class_name": "EulerDiscreteScheduler" if xl else "DDIMScheduler",
        **betas,
        "prediction_type": _PREDICTION[as_parameterization(components.parameterization).name],
        "timestep_spacing": schedule["timestep_spacing"],
        "steps_offset": int(schedule["steps_offset"]),
        **({} if xl else {"set_alpha_to_one": bool(schedule["set_alpha_to_one"]), "clip_sample": False}),
    }


def _model_index(xl: bool, scheduler: str) -> dict[str, Any]:
    parts = {
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler],
    }
    if xl:
        parts.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
        return {"_class_name": "StableDiffusionXLPipeline", **parts, "force_zeros_for_empty_prompt": True}
    none = [None, None]
    return {
        "_class_name": "StableDiffusionPipeline",
        **parts,
        "safety_checker": none,
        "feature_extractor": none,
        "requires_safety_checker": False,
    }
