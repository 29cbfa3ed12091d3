"""Write a Stable Diffusion single ``.safetensors`` file (original LDM layout) from our modules.

Our exports add ``ldm.config`` metadata (the architecture of every part), so any model we write, tiny or
full size, loads back without presets; small custom tokenizers are embedded as ``ldm.tokenizer/<file>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion import DiffusionSchedule, Parameterization, V, as_parameterization
from ldm.io.components import SDComponents, as_dtype
from ldm.io.describe import describe_schedule, describe_text_encoder, describe_unet, describe_vae
from ldm.io.openclip import hf_to_openclip, hf_to_openclip_projected
from ldm.io.sd_keys import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    SDXL_REFINER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from ldm.io.sd_presets import SD_SCHEDULE, STANDARD_CLIP_VOCAB, TEXT_CONFIG_FIELDS, version_of
from ldm.io.sd_tokenizer import TOKENIZER_METADATA_PREFIX, tokenizer_files
from ldm.io.single_file import CONFIG_METADATA_KEY
from ldm.io.strict_load import build_on_meta, state_dict_mismatches
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from ldm.utils.files import atomic_save_safetensors
from ldm.utils.logging import get_logger

__all__ = ["export_components", "export_single_file"]

log = get_logger(__name__)


def export_single_file(
    path: str | os.PathLike,
    unet: UNetModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextEncoder,
    *,
    schedule: DiffusionSchedule | None = None,
    parameterization: str | Parameterization = "eps",
    scale_factor: float = 0.18215,
    resolution: int | None = None,
    version: str | None = None,
    dtype: torch.dtype | str = torch.float16,
    metadata: Mapping[str, Any] | None = None,
    embed_tokenizer: bool | None = None,
    text_encoder_2: CLIPTextEncoder | None = None,
) -> Path:
    """Write a Stable Diffusion single ``.safetensors`` file (original LDM layout).

    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and the text encoder as
    ``cond_stage_model.transformer.text_model.*`` (SD v1 CLIP layout) or, with ``version="v2"`` (the
    default when the text encoder is 1024 wide), ``cond_stage_model.model.*`` (OpenCLIP layout, 23 blocks).
    With ``text_encoder_2`` (SDXL's pooled bigG; ``version="sdxl"``): sgm's SDXL layout,
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
    (OpenCLIP names, fused ``in_proj``, ``text_projection``), what ComfyUI, AUTOMATIC1111 and
    ``StableDiffusionXLPipeline.from_single_file`` read. ``version="sdxl_refiner"``: the SDXL refiner's
    layout, its one pooled bigG at ``conditioner.embedders.0.model.*``.
    Floating tensors are cast to ``dtype`` (default fp16). The schedule's ``betas``/``alphas_cumprod`` are
    stored as in the released files; ``v_pred`` marks v-prediction. Metadata: ``ldm.config`` (the
    architecture, so the file loads back without presets), ``modelspec.*``, the small custom tokenizer when
    ``embed_tokenizer`` (default: only when its vocabulary is not the released CLIP one), and ``metadata``
    (non-strings JSON-encoded).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export writes .safetensors files (safe to load anywhere); got {str(path)!r}")
    target = as_dtype(dtype)
    text_config = describe_text_encoder(text_encoder)
    if version is None:
        version = (
            "sdxl" if text_encoder_2 is not None else "v2" if text_config["hidden_size"] == 1024 else "v1"
        )
    refiner = version == "sdxl_refiner" and text_encoder_2 is None  # its one bigG at SDXL_REFINER_PREFIX
    if not refiner and (
        version not in ("v1", "v2", "sdxl") or (version == "sdxl") != (text_encoder_2 is not None)
    ):
        raise ValueError(
            f"version must be 'v1' or 'v2' (the text encoder layout), 'sdxl' with text_encoder_2 or "
            f"'sdxl_refiner' without; got {version!r} with "
            f"{'two text encoders' if text_encoder_2 is not None else 'one text encoder'}"
        )
    texts = (
        _bigg_tensors(text_encoder, SDXL_REFINER_PREFIX)
        if refiner
        else _text_encoder_tensors(text_encoder, text_config, version)
    )
    tensors = {**_unet_vae_tensors(unet, vae), **texts, **_schedule_tensors(schedule, parameterization)}
    config = _architecture(unet, vae, text_config, schedule, parameterization, scale_factor, resolution)
    if refiner:  # ``ldm.config`` says so: the file loads back as a refiner
        config["refiner"] = True
    if text_encoder_2 is not None:
        tensors.update(_bigg_tensors(text_encoder_2))
        config["text_encoder_2"] = describe_text_encoder(text_encoder_2)
    if refiner or text_encoder_2 is not None:
        config["version"] = version_of(config["unet"], text_config)
        config["resolution"] = int(resolution or 1024)
    return _write(path, tensors, config, text_encoder, target, metadata, embed_tokenizer)


def _write(path, tensors, config, text_encoder, target, metadata, embed_tokenizer) -> Path:
    """The tensors (cast to ``target``) and the metadata header, atomically."""
    tensors = {k: _tensor_for_file(v, target) for k, v in tensors.items()}
    header = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config), **_modelspec(config)}
    header.update(_tokenizer_metadata(text_encoder, embed_tokenizer))
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    atomic_save_safetensors(tensors, path, header)
    log.info(f"wrote {path} ({len(tensors)} tensors, {target}, SD {config['version']} layout)")
    return path


def export_components(components: SDComponents, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``export_single_file`` with the components' schedule, parameterization, scale factor and resolution."""
    kwargs = {
        "schedule": components.schedule,
        "parameterization": components.parameterization,
        "scale_factor": components.scale_factor,
        "resolution": components.resolution,
        **kwargs,
    }
    kwargs.setdefault("text_encoder_2", components.text_encoder_2)
    if components.refiner:
        kwargs.setdefault("version", "sdxl_refiner")
    return export_single_file(path, components.unet, components.vae, components.text_encoder, **kwargs)


def _check_exportable(module: nn.Module, config: Mapping[str, Any], factory: Callable, what: str) -> dict:
    state = module.state_dict()
    problems = state_dict_mismatches(build_on_meta(factory, config).state_dict(), state)
    if problems:
        raise ValueError(
            f"cannot export the {what}: its weights are not those of a plain {factory.__name__} "
            f"({problems}). Merge adapters (LoRA, ...) into the weights before exporting."
        )
    return state


def _tensor_for_file(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def _unet_vae_tensors(unet: UNetModel, vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in _check_exportable(unet, describe_unet(unet), UNetModel, "UNet").items():
        tensors[UNET_PREFIX + key] = value
    for key, value in _check_exportable(vae, describe_vae(vae), AutoencoderKL, "VAE").items():
        tensors[VAE_PREFIX + key] = value
    return tensors


def _text_encoder_tensors(
    text_encoder: CLIPTextEncoder, text_config: Mapping[str, Any], version: str
) -> dict[str, torch.Tensor]:
    """The text tower in the SD v1 CLIP layout (``version="v1"``) or the SD v2 OpenCLIP layout."""
    text_state = {
        k: v for k, v in text_encoder.transformer.state_dict().items() if not k.endswith("position_ids")
    }
    expected_text = CLIPTextEncoder.from_config(
        {k: text_config[k] for k in TEXT_CONFIG_FIELDS}, device="meta"
    )
    problems = state_dict_mismatches(expected_text.transformer.state_dict(), text_state)
    if problems:
        raise ValueError(f"cannot export the text encoder: not a plain CLIP text model ({problems})")
    if version == "v2":
        return {OPENCLIP_PREFIX + key: value for key, value in hf_to_openclip(text_state).items()}
    prefix = SDXL_CLIP_PREFIX if version == "sdxl" else CLIP_PREFIX
    tensors = {prefix + key: value for key, value in text_state.items()}
    positions = int(text_config["max_position_embeddings"])
    tensors[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return tensors


def _bigg_tensors(
    text_encoder: CLIPTextEncoder, prefix: str = SDXL_OPENCLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (a ``CLIPTextModelWithProjection``) in the OpenCLIP layout of its files
    (the refiner's one: ``prefix`` ``SDXL_REFINER_PREFIX``)."""
    config = describe_text_encoder(text_encoder)
    state = {k: v for k, v in text_encoder.transformer.state_dict().items() if not k.endswith("position_ids")}
    expected = PooledCLIPTextEncoder.from_config({k: config[k] for k in TEXT_CONFIG_FIELDS}, device="meta")
    problems = state_dict_mismatches(expected.transformer.state_dict(), state)
    if problems:
        raise ValueError(
            f"cannot export text encoder 2: not a plain CLIP text model with projection ({problems})"
        )
    return {prefix + key: value for key, value in hf_to_openclip_projected(state).items()}


def _schedule_tensors(
    schedule: DiffusionSchedule | None, parameterization: str | Parameterization
) -> dict[str, torch.Tensor]:
    tensors = {}
    if schedule is not None:
        tensors["betas"] = schedule.betas.float()
        tensors["alphas_cumprod"] = schedule.alphas_cumprod.float()
    if as_parameterization(parameterization) is V:  # the marker SD 2.x-v files carry (ComfyUI reads it)
        tensors["v_pred"] = torch.tensor([])
    return tensors


def _architecture(
    unet: UNetModel,
    vae: AutoencoderKL,
    text_config: Mapping[str, Any],
    schedule: DiffusionSchedule | None,
    parameterization: str | Parameterization,
    scale_factor: float,
    resolution: int | None,
) -> dict[str, Any]:
    """The ``ldm.config`` metadata: everything ``load_single_file`` needs to rebuild the model."""
    unet_config = describe_unet(unet)
    arch_version = version_of(unet_config, text_config)
    parameterization = as_parameterization(parameterization)
    resolution = int(resolution or (768 if arch_version == "v2" and parameterization is V else 512))
    return {
        "version": arch_version,
        "unet": unet_config,
        "vae": describe_vae(vae),
        "text_encoder": dict(text_config),
        "schedule": describe_schedule(schedule) if schedule is not None else dict(SD_SCHEDULE),
        "parameterization": parameterization.name,
        "scale_factor": float(scale_factor),
        "resolution": resolution,
    }


def _modelspec(config: Mapping[str, Any]) -> dict[str, str]:
    """``modelspec.*`` metadata (Stability AI's model spec) for the architecture ``config``."""
    version, parameterization, resolution = (
        config["version"],
        as_parameterization(config["parameterization"]),
        config["resolution"],
    )
    architecture = {
        "v1": "stable-diffusion-v1",
        "v2": "stable-diffusion-v2",
        "sdxl": "stable-diffusion-xl-v1-base",
        "sdxl_refiner": "stable-diffusion-xl-v1-refiner",
    }.get(version, "ldm-custom")
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture
        + ("-768-v" if version == "v2" and parameterization is V else ""),
        "modelspec.prediction_type": parameterization.modelspec_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
    }


def _tokenizer_metadata(text_encoder: CLIPTextEncoder, embed_tokenizer: bool | None) -> dict[str, str]:
    """``ldm.tokenizer/<file>`` entries when the tokenizer is embedded (default: for a non-standard
    vocabulary)."""
    tokenizer = getattr(text_encoder, "tokenizer", None)
    if embed_tokenizer is None:
        embed_tokenizer = tokenizer is not None and len(tokenizer) != STANDARD_CLIP_VOCAB
    if not embed_tokenizer:
        return {}
    if tokenizer is None:
        raise ValueError("embed_tokenizer=True but the text encoder has no tokenizer")
    tokenizer.model_max_length = text_encoder.max_length
    return {TOKENIZER_METADATA_PREFIX + name: text for name, text in tokenizer_files(tokenizer).items()}
