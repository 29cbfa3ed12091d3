"""Load a Stable Diffusion single file (``.safetensors`` / weights-only ``.ckpt``) into ``SDComponents``.

Loading is strict: every tensor of the UNet, VAE and text encoder must be in the file with the right shape,
and a key outside the known groups (``sd_keys``) stops the load; errors name the first mismatched keys and
shapes. The architecture comes from the caller's preset/overrides, else our exports' ``ldm.config``
metadata, else the preset detected from the keys.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ldm.diffusion import DiffusionSchedule
from ldm.io.components import SDComponents, as_dtype, finalize
from ldm.io.describe import build_schedule
from ldm.io.openclip import openclip_to_hf, openclip_to_hf_projected
from ldm.io.safe_load import read_checkpoint, unwrap_state_dict
from ldm.io.sd_keys import (
    SCHEDULE_BUFFERS,
    detect_version,
    ema_key,
    guess_v2_parameterization,
    split_single_file,
)
from ldm.io.sd_presets import (
    PRESETS,
    STANDARD_CLIP_VOCAB,
    TEXT_CONFIG_FIELDS,
    resolve_preset,
    version_of,
)
from ldm.io.sd_tokenizer import TOKENIZER_METADATA_PREFIX, resolve_tokenizer
from ldm.io.strict_load import build_on_meta, load_strict
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from ldm.utils.logging import get_logger

__all__ = ["CONFIG_METADATA_KEY", "load_single_file"]

log = get_logger(__name__)

CONFIG_METADATA_KEY = "ldm.config"


def load_single_file(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    *,
    preset: str | Mapping | None = None,
    unet: Mapping | None = None,
    vae: Mapping | None = None,
    text_encoder: str | Mapping | None = None,
    text_encoder_2: str | Mapping | None = None,
    schedule: Mapping | None = None,
    parameterization: str | None = None,
    scale_factor: float | None = None,
    resolution: int | None = None,
    tokenizer: Any = None,
    metadata: Mapping[str, str] | None = None,
    name: str | None = None,
) -> SDComponents:
    """Components of a Stable Diffusion single file (path or an already read state dict).

    Architecture, in order of precedence: the keyword overrides (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``, ``schedule`` dicts update the preset), ``preset`` (``"v1"``; ``"v2"`` = 2.x 512-base;
    ``"v2-v"`` = 2.x 768-v; ``"sdxl"`` = SDXL base 1.0; ``"sdxl_refiner"`` = SDXL refiner 1.0: its one
    bigG at ``conditioner.embedders.0.model.*`` becomes ``text_encoder``), the file's own ``ldm.config``
    metadata (our exports), else the preset detected from the keys. SDXL files
    (``conditioner.embedders.0.transformer.*`` CLIP-L,
    ``conditioner.embedders.1.model.*`` OpenCLIP bigG) give ``text_encoder_2`` as well.
    ``use_ema`` takes the ``model_ema.*`` UNet weights when the file has them. ``dtype``: default float32.
    ``tokenizer``: a ``CLIPTokenizer`` or a folder; default: embedded in the file, else the released one from
    the Hugging Face cache (SDXL's bigG gets a copy padding with "!"). ``metadata``/``name``: for an already
    read state dict, its file's metadata and name (for messages). Any mismatch raises ``ValueError`` naming
    keys and shapes.
    """
    state, metadata, name = _read_source(source, metadata, name, as_dtype(dtype))
    groups = split_single_file(state, name)
    overrides = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "schedule": schedule,
        "parameterization": parameterization,
        "scale_factor": scale_factor,
        "resolution": resolution,
    }
    config, hint = _architecture(state, metadata, name, preset, overrides)
    text_config = {k: v for k, v in config["text_encoder"].items() if k in TEXT_CONFIG_FIELDS}
    version = version_of(config["unet"], text_config)
    unet_module = _load_unet(groups, config["unet"], use_ema, name, hint)
    vae_module = _load_vae(groups["vae"], config["vae"], name, hint)
    refiner = bool(config.get("refiner"))
    if refiner:  # the SDXL refiner: bigG alone, pooled
        text_module = _load_text_encoder_2(groups["clip_g"], config["text_encoder"], name, hint)
    else:
        text_module = _load_text_encoder(groups, config["text_encoder"], name, hint)
    text_module.tokenizer = resolve_tokenizer(
        tokenizer, version, metadata, int(text_config["vocab_size"]), text_module.max_length
    )
    if refiner:
        embedded = any(k.startswith(TOKENIZER_METADATA_PREFIX) for k in metadata)
        text_module.tokenizer = _bigg_tokenizer(text_module.tokenizer, embedded)
    text_module_2 = None
    if "text_encoder_2" in config:
        text_module_2 = _load_text_encoder_2(groups["clip_g"], config["text_encoder_2"], name, hint)
        embedded = any(k.startswith(TOKENIZER_METADATA_PREFIX) for k in metadata)
        text_module_2.tokenizer = _bigg_tokenizer(text_module.tokenizer, embedded)
    components = SDComponents(
        unet=unet_module,
        vae=vae_module,
        text_encoder=text_module,
        schedule=_schedule(config["schedule"], groups["extra"].get("betas"), schedule is None, name),
        parameterization=config["parameterization"],
        scale_factor=float(config["scale_factor"]),
        version=version,
        resolution=int(config["resolution"]),
        text_encoder_2=text_module_2,
        refiner=refiner,
    )
    return finalize(components, dtype)


def _read_source(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    name: str | None,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(state dict, metadata, name for messages) of a path or an already read state dict. A file's weights
    are converted to ``dtype`` as they are read (the schedule buffers keep theirs)."""
    if isinstance(source, Mapping):
        name = name or "<state dict>"
        return unwrap_state_dict(source, name), dict(metadata or {}), name
    name = name or str(source)
    state, file_metadata = read_checkpoint(source, dtype, keep_dtype=SCHEDULE_BUFFERS)
    return state, {**file_metadata, **(metadata or {})}, name


def _architecture(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    name: str,
    preset: str | Mapping | None,
    overrides: Mapping[str, Any],
) -> tuple[dict[str, Any], str]:
    """(resolved preset, hint for mismatch errors): ``preset``, else ``ldm.config``, else detected."""
    detected = detect_version(state)
    if preset is not None:
        config = resolve_preset(preset, **overrides)
        origin = f"preset {preset!r}" if isinstance(preset, str) else "the given preset"
    elif CONFIG_METADATA_KEY in metadata:
        config = resolve_preset(json.loads(metadata[CONFIG_METADATA_KEY]), **overrides)
        origin = "the file's ldm.config metadata"
    else:
        base = detected
        if detected == "v2":
            guess = overrides.get("parameterization") or guess_v2_parameterization(state, metadata, name)
            base = "v2-v" if guess == "v" else "v2"
        config = resolve_preset(base, **overrides)
        origin = f"preset {base!r} (detected from the keys)"
    if any(overrides.get(k) is not None for k in ("unet", "vae", "text_encoder", "text_encoder_2")):
        origin += " with overrides"
    _check_family(detected, _family(config), name, origin)
    hint = (
        f"The architecture came from {origin}; the keys look like SD {detected}. Pick the matching "
        f"preset ({', '.join(sorted(PRESETS))}) or override unet=/vae=/text_encoder=."
    )
    return config, hint


def _family(config: Mapping[str, Any]) -> str:
    """``"sdxl_refiner"``, ``"sdxl"`` (two text encoders) or ``"sd"`` (SD 1.x/2.x) of a resolved preset."""
    return "sdxl_refiner" if config.get("refiner") else "sdxl" if "text_encoder_2" in config else "sd"


_FAMILY_FILES = {
    "sdxl": "an SDXL base file",
    "sdxl_refiner": "an SDXL refiner file (conditioner.embedders.0.model.*: OpenCLIP bigG alone)",
}
_FAMILY_ARCHITECTURES = {"sd": "an SD 1.x/2.x", "sdxl": "an SDXL base", "sdxl_refiner": "an SDXL refiner"}
_FAMILY_PRESETS = {
    "sd": "preset 'v1', 'v2' or 'v2-v'",
    "sdxl": "preset 'sdxl'",
    "sdxl_refiner": "preset 'sdxl_refiner'",
}


def _check_family(detected: str, config_family: str, name: str, origin: str) -> None:
    """A file of one family (SD 1.x/2.x, SDXL base, SDXL refiner) read as another stops here, before any
    weights are matched."""
    file_family = detected if detected in _FAMILY_FILES else "sd"
    if file_family == config_family:
        return
    found = _FAMILY_FILES.get(file_family, f"an SD {detected} file (no SDXL conditioner keys)")
    raise ValueError(
        f"{name} is {found}, but {origin} is {_FAMILY_ARCHITECTURES[config_family]} architecture; "
        f"use {_FAMILY_PRESETS[file_family]}."
    )


def _bigg_tokenizer(tokenizer: Any, embedded: bool) -> Any:
    """The bigG embedder's tokenizer: CLIP's, padding with "!" as OpenCLIP (and diffusers' ``tokenizer_2/``)
    does; a tokenizer embedded in our export (small custom vocabularies) as it is. Always a copy: a token
    added to one encoder (an embedding) must not appear in the other's vocabulary without its row."""
    if tokenizer is None:
        return None
    second = copy.deepcopy(tokenizer)
    if not embedded and len(tokenizer) == STANDARD_CLIP_VOCAB:
        second.pad_token = "!"
    return second


def _load_text_encoder_2(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], name: str, hint: str
) -> PooledCLIPTextEncoder:
    """SDXL's OpenCLIP bigG (all its blocks, with the text projection), without a tokenizer yet."""
    text_config = {k: v for k, v in config.items() if k in TEXT_CONFIG_FIELDS}
    options = {k: config[k] for k in ("max_length", "layer", "final_layer_norm") if k in config}
    hf_state = openclip_to_hf_projected(state, int(text_config["num_hidden_layers"]))
    module = PooledCLIPTextEncoder.from_config(dict(text_config), device="meta", **options)
    load_strict(module.transformer, hf_state, "text encoder 2 (OpenCLIP bigG)", name, hint)
    return module


def _load_unet(
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    config: Mapping[str, Any],
    use_ema: bool,
    name: str,
    hint: str,
) -> UNetModel:
    """The UNet, from ``model_ema.*`` when ``use_ema`` and the file has EMA weights."""
    unet_module = build_on_meta(UNetModel, config)
    unet_state = groups["unet"]
    ema_weights = {k: v for k, v in groups["ema"].items() if k not in SCHEDULE_BUFFERS}
    if use_ema and ema_weights:
        lookup = {ema_key(k): k for k in unet_module.state_dict()}
        unet_state = {lookup.get(k, k): v for k, v in ema_weights.items()}
        log.info(f"{name}: using the EMA UNet weights (model_ema.*)")
    elif use_ema:
        log.info(
            f"{name}: no model_ema.* weights; using model.diffusion_model.* (in '-emaonly' files these are "
            "the EMA weights)"
        )
    return load_strict(
        unet_module, unet_state, "UNet (EMA)" if use_ema and ema_weights else "UNet", name, hint
    )


def _load_vae(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], name: str, hint: str
) -> AutoencoderKL:
    vae_state = dict(state)
    for key, value in vae_state.items():  # some converted files store the VAE attention as Linear [C, C]
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            vae_state[key] = value[:, :, None, None]
    return load_strict(build_on_meta(AutoencoderKL, config), vae_state, "VAE", name, hint)


def _load_text_encoder(
    groups: Mapping[str, Mapping[str, torch.Tensor]], config: Mapping[str, Any], name: str, hint: str
) -> CLIPTextEncoder:
    """The CLIP text tower (SD v1 layout, or SD v2 OpenCLIP converted), without a tokenizer yet."""
    text_config = {k: v for k, v in config.items() if k in TEXT_CONFIG_FIELDS}
    options = {k: config[k] for k in ("max_length", "layer", "final_layer_norm") if k in config}
    if groups["openclip"]:
        clip_state = openclip_to_hf(groups["openclip"], int(text_config["num_hidden_layers"]))
    else:
        clip_state = groups["clip"]
    text_module = CLIPTextEncoder.from_config(dict(text_config), device="meta", **options)
    load_strict(text_module.transformer, clip_state, "text encoder", name, hint)
    return text_module


def _schedule(
    config: Mapping[str, Any], file_betas: torch.Tensor | None, use_file_betas: bool, name: str
) -> DiffusionSchedule:
    """The configured schedule, or the file's own betas when they differ and no schedule was given."""
    sched = build_schedule(config)
    if use_file_betas and file_betas is not None:
        betas = file_betas.double().flatten()
        if betas.shape != sched.betas.shape or not torch.allclose(betas, sched.betas, rtol=1e-4):
            log.info(f"{name}: using the file's own beta schedule ({len(betas)} steps)")
            sched = DiffusionSchedule(betas, sched.convention)
    return sched
