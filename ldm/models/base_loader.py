"""One entry point for a pretrained base model, whatever its format: ``load_base_model(source)``.

It rebuilds our own Lightning checkpoints (which needs the LightningModules of this layer) and hands every
other source (SD single files, diffusers folders, hub ids) to ``ldm.io.sources.load_pretrained``.
Fine-tuning configs point one key at it (``model.base``); ``sample.py --ckpt`` accepts the same sources.
``latent_diffusion_from_components`` turns the loaded parts into a ``LatentDiffusion`` for sampling.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ldm.diffusion import DiffusionSchedule, build_sampler
from ldm.io.clip_bpe import OPEN_CLIP_INSTALL_HINT
from ldm.io.components import SDComponents, finalize
from ldm.io.describe import describe_text_encoder, describe_unet
from ldm.io.sd_presets import version_of
from ldm.io.sd_tokenizer import TOKENIZER_HINT
from ldm.io.sources import (
    COMMON_OVERRIDES,
    check_overrides,
    identify_source,
    load_pretrained,
    plain_overrides,
)
from ldm.io.vae_file import load_replacement_vae
from ldm.models.checkpoint import load_lightning_model
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.utils.logging import get_logger

__all__ = ["components_from_lightning", "latent_diffusion_from_components", "load_base_model"]

log = get_logger(__name__)


def load_base_model(
    source: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    vae_path: str | os.PathLike | None = None,
    **preset_overrides: Any,
) -> SDComponents:
    """The ``SDComponents`` (unet, vae, text_encoder, schedule, parameterization, scale_factor, version,
    resolution) of ``source``: an SD single file, one of our Lightning checkpoints, a diffusers folder or a
    hub id (``ldm.io.sources`` describes them).

    ``use_ema``: take the EMA UNet weights when the source has them. ``dtype``: default float32 (SDXL's VAE
    stays float32 under float16). ``vae_path``: a replacement VAE (``ldm.io.vae_file``: a VAE file in LDM or
    diffusers names, or a diffusers VAE folder) of the same architecture, used instead of the source's.
    ``preset_overrides``:
      single files -- ``preset`` ("v1" | "v2" | "v2-v" | "sdxl" | "sdxl_refiner"),
        ``unet``/``vae``/``text_encoder``/``schedule`` (dicts updating the preset), ``parameterization``,
        ``scale_factor``, ``resolution``, ``tokenizer``;
      diffusers folders / hub ids -- ``parameterization``, ``scale_factor``, ``resolution``, ``schedule``,
        ``variant`` (and ``revision`` for hub ids);
      our Lightning checkpoints -- ``parameterization``, ``scale_factor``, ``resolution``, ``schedule``.
    Unknown or inapplicable overrides raise ``TypeError``; mismatched weights raise ``ValueError``.
    """
    found = identify_source(source)
    if found.kind != "lightning":
        components = load_pretrained(found, use_ema, dtype, **preset_overrides)
    else:
        overrides = plain_overrides(preset_overrides)
        check_overrides(overrides, COMMON_OVERRIDES, "our Lightning checkpoint")
        components = components_from_lightning(
            found.path, use_ema, dtype, checkpoint=found.payload, **overrides
        )
    if vae_path:
        components.vae = load_replacement_vae(vae_path, components.vae)
        log.info(f"VAE replaced by {vae_path}")
    return components


def components_from_lightning(
    path: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    *,
    parameterization: str | None = None,
    scale_factor: float | None = None,
    resolution: int | None = None,
    schedule: Mapping | None = None,
    checkpoint: Mapping | None = None,
) -> SDComponents:
    """The parts of one of our Lightning checkpoints (``load_lightning_model``); the EMA UNet when ``use_ema``
    and the model keeps one. ``checkpoint``: the file's contents when already read (each file is read
    once)."""
    model = load_lightning_model(path, checkpoint=checkpoint)
    missing = [name for name in ("unet", "vae", "conditioner", "schedule") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{path}: {type(model).__name__} has no {missing}; not a text-to-image model")
    ema = getattr(model, "unet_ema", None)
    unet = ema.module if use_ema and ema is not None else model.unet
    if use_ema and ema is None:
        log.info(f"{path}: the model keeps no EMA UNet; using its UNet")
    factor = float(scale_factor if scale_factor is not None else model.scale_factor)
    if factor <= 0:
        raise ValueError(
            f"{path}: scale_factor was never estimated (the run stopped before its first batch); "
            "pass scale_factor=..."
        )
    config = getattr(model, "model_config", None) or {}
    unet_config = describe_unet(unet)
    texts = model.conditioner.text_embedders
    if len(texts) not in (1, 2):
        raise ValueError(f"{path}: {len(texts)} text embedders; SD 1.x/2.x have one, SDXL two")
    components = SDComponents(
        unet=unet,
        vae=model.vae,
        text_encoder=texts[0],
        text_encoder_2=texts[1] if len(texts) == 2 else None,
        schedule=DiffusionSchedule.from_config(**schedule) if schedule else model.schedule,
        parameterization=parameterization or model.hparams.get("parameterization", "eps"),
        scale_factor=factor,
        version=version_of(unet_config, describe_text_encoder(texts[0])),
        resolution=int(resolution or config.get("vae", {}).get("resolution", 32)),
    )
    return finalize(components, dtype)


def latent_diffusion_from_components(
    components: SDComponents, sampler: Callable | None = None, guidance_scale: float = 7.5, **kwargs: Any
):
    """A ``LatentDiffusion`` for sampling (or a starting point) from ``components``: no EMA copy, an inert
    SGD(lr=0) optimiser, ``image_resolution`` = the components' resolution. ``kwargs`` go to the
    constructor."""
    if any(getattr(text, "tokenizer", None) is None for text in components.text_encoders):
        raise ValueError(
            f"the text encoder has no tokenizer, so prompts cannot be encoded. {TOKENIZER_HINT} "
            f"(in Python: load_base_model(..., tokenizer=<folder>)), or {OPEN_CLIP_INSTALL_HINT}"
        )
    model = LatentDiffusion(
        unet=components.unet,
        vae=components.vae,
        conditioner=components.conditioner(),
        schedule=components.schedule,
        sampler=sampler or build_sampler("dpmpp_2m", steps=25),
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        scheduler=None,
        parameterization=components.parameterization,
        scale_factor=components.scale_factor,
        ema_decay=None,
        guidance_scale=guidance_scale,
        **kwargs,
    )
    model.image_resolution = components.resolution
    model._vae_loaded = True
    return model.eval()
