"""One entry point for a pretrained base model, whatever its format: ``load_base_model(source)``.

``source`` may be
  * a Stable Diffusion single file: ``.safetensors`` (preferred) or a weights-only ``.ckpt``/``.pt``/``.pth``;
  * one of our Lightning checkpoints (``.ckpt`` carrying ``model_config``, written by ``train.py``);
  * a diffusers folder (with ``model_index.json``);
  * a Hugging Face Hub id such as ``runwayml/stable-diffusion-v1-5`` (downloaded when online; with
    ``HF_HUB_OFFLINE=1`` only the local cache is used, and a miss is a fast, clear error).

Fine-tuning configs point one key at it (``model.base``); ``sample.py --ckpt`` accepts the same sources.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.io.diffusers_folder import download_from_hub, load_diffusers_folder, looks_like_hub_id
from ldm.io.stable_diffusion import (
    SDComponents,
    describe_text_encoder,
    describe_unet,
    finalize,
    load_single_file,
    read_checkpoint,
    safe_torch_load,
    unwrap_state_dict,
    version_of,
)
from ldm.utils.logging import get_logger

log = get_logger(__name__)

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_COMMON_OVERRIDES = ("parameterization", "scale_factor", "resolution", "schedule")
_SINGLE_FILE_OVERRIDES = (*_COMMON_OVERRIDES, "preset", "unet", "vae", "text_encoder", "tokenizer")


def load_base_model(
    source: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    **preset_overrides: Any,
) -> SDComponents:
    """The ``SDComponents`` (unet, vae, text_encoder, schedule, parameterization, scale_factor, version,
    resolution) of ``source``; see the module docstring for what ``source`` may be.

    ``use_ema``: take the EMA UNet weights when the source has them. ``dtype``: default float32.
    ``preset_overrides``:
      single files -- ``preset`` ("v1" | "v2" | "v2-v"), ``unet``/``vae``/``text_encoder``/``schedule``
        (dicts updating the preset), ``parameterization``, ``scale_factor``, ``resolution``, ``tokenizer``;
      diffusers folders / hub ids -- ``parameterization``, ``scale_factor``, ``resolution``, ``schedule``,
        ``variant`` (and ``revision`` for hub ids);
      our Lightning checkpoints -- ``parameterization``, ``scale_factor``, ``resolution``, ``schedule``.
    Unknown or inapplicable overrides raise ``TypeError``; mismatched weights raise ``ValueError``.
    """
    overrides = {k: _plain(v) for k, v in preset_overrides.items() if v is not None}
    text = os.fspath(source).strip()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            _only(overrides, _SINGLE_FILE_OVERRIDES, "a single file")
            return load_single_file(path, use_ema, dtype, **overrides)
        if path.suffix not in _PICKLE_SUFFIXES:
            raise ValueError(
                f"{text}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt"
            )
        payload = safe_torch_load(path, mmap=True)
        if isinstance(payload, Mapping) and "model_config" in payload:
            del payload
            _only(overrides, _COMMON_OVERRIDES, "our Lightning checkpoint")
            return components_from_lightning(path, use_ema, dtype, **overrides)
        _only(overrides, _SINGLE_FILE_OVERRIDES, "a single file")
        return load_single_file(unwrap_state_dict(payload, text), use_ema, dtype, **overrides, name=text)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{text} is a folder without model_index.json: not a diffusers model folder "
                "(pass a .safetensors/.ckpt file, a diffusers folder or a hub id)"
            )
        _only(overrides, ("variant", *_COMMON_OVERRIDES), "a diffusers folder")
        return load_diffusers_folder(path, use_ema, dtype, **overrides)
    if looks_like_hub_id(text):
        _only(overrides, ("variant", "revision", *_COMMON_OVERRIDES), "a hub id")
        revision = overrides.pop("revision", None)
        folder = download_from_hub(text, use_ema=use_ema, revision=revision, variant=overrides.get("variant"))
        return load_diffusers_folder(folder, use_ema, dtype, **overrides)
    raise FileNotFoundError(
        f"base model {text!r} is neither an existing file or folder nor a hub id (organisation/name)"
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "_metadata") and hasattr(value, "_content"):  # omegaconf containers from Hydra
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _only(overrides: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    extra = sorted(set(overrides) - set(allowed))
    if extra:
        raise TypeError(f"{extra} cannot be overridden for {what}; allowed: {sorted(allowed)}")


def is_lightning_checkpoint(path: str | os.PathLike) -> bool:
    """True for one of our Lightning checkpoints (a weights-only pickle with ``model_config``)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in _PICKLE_SUFFIXES:
        return False
    try:
        payload = safe_torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - not ours (or unsafe): load_base_model gives the real error
        return False
    return isinstance(payload, Mapping) and "model_config" in payload


def components_from_lightning(
    path: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    *,
    parameterization: str | None = None,
    scale_factor: float | None = None,
    resolution: int | None = None,
    schedule: Mapping | None = None,
) -> SDComponents:
    """The parts of one of our Lightning checkpoints (``load_lightning_model``); the EMA UNet when ``use_ema``
    and the model keeps one."""
    from ldm.diffusion import DiffusionSchedule
    from ldm.models.checkpoint import load_lightning_model

    model = load_lightning_model(path)
    missing = [name for name in ("unet", "vae", "text_encoder", "schedule") if not hasattr(model, name)]
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
    components = SDComponents(
        unet=unet,
        vae=model.vae,
        text_encoder=model.text_encoder,
        schedule=DiffusionSchedule.from_config(**schedule) if schedule else model.schedule,
        parameterization=parameterization or model.hparams.get("parameterization", "eps"),
        scale_factor=factor,
        version=version_of(unet_config, describe_text_encoder(model.text_encoder)),
        resolution=int(resolution or config.get("vae", {}).get("resolution", 32)),
    )
    return finalize(components, dtype)


def latent_diffusion_from_components(
    components: SDComponents, sampler: Callable | None = None, guidance_scale: float = 7.5, **kwargs: Any
):
    """A ``LatentDiffusion`` for sampling (or a starting point) from ``components``: no EMA copy, an inert
    SGD(lr=0) optimiser, ``image_resolution`` = the components' resolution. ``kwargs`` go to the
    constructor."""
    from ldm.diffusion import build_sampler
    from ldm.models.latent_diffusion import LatentDiffusion

    if getattr(components.text_encoder, "tokenizer", None) is None:
        raise ValueError(
            "the text encoder has no tokenizer, so prompts cannot be encoded: pass tokenizer=<folder "
            "with vocab.json and merges.txt> (e.g. a diffusers model's tokenizer/) when loading"
        )
    model = LatentDiffusion(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
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


__all__ = [
    "SDComponents",
    "components_from_lightning",
    "is_lightning_checkpoint",
    "latent_diffusion_from_components",
    "load_base_model",
    "read_checkpoint",
]
