"""Diffusers Stable Diffusion folders and hub repos -> our modules.

A folder holds ``model_index.json``, ``unet/`` and ``vae/`` (``config.json`` + weights), ``text_encoder/``
and ``tokenizer/`` (transformers CLIP, already our layout) and ``scheduler/scheduler_config.json`` (beta
schedule and ``prediction_type``). SDXL pipelines (``StableDiffusionXLPipeline``) add ``text_encoder_2/``
(a transformers ``CLIPTextModelWithProjection``: OpenCLIP bigG) and ``tokenizer_2/``; both text encoders are
then used at their penultimate layer without the final layer norm, as the pipeline does. The SDXL refiner
(``requires_aesthetics_score: true``, ``text_encoder``/``tokenizer`` null) has ``text_encoder_2/`` and
``tokenizer_2/`` alone: that one pooled bigG, at the penultimate layer too. Keys are renamed by
``ldm.io.diffusers_names``, configs translated by ``ldm.io.diffusers_config``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.io.components import SDComponents, finalize
from ldm.io.describe import build_schedule
from ldm.io.diffusers_config import (
    schedule_from_diffusers,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
)
from ldm.io.diffusers_names import diffusers_unet_to_ldm, diffusers_vae_to_ldm
from ldm.io.safe_load import read_checkpoint
from ldm.io.sd_presets import version_of
from ldm.io.strict_load import build_on_meta, load_strict
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from ldm.utils.hub import hub_offline
from ldm.utils.logging import get_logger

__all__ = ["download_from_hub", "load_diffusers_folder", "read_component_weights"]

log = get_logger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a complete diffusers Stable Diffusion folder")
    return json.loads(path.read_text(encoding="utf-8"))


def read_component_weights(
    folder: Path, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> dict[str, torch.Tensor]:
    """Weights of one component folder: ``<stem>[.<variant>].safetensors``, a sharded ``.index.json``, or a
    weights-only ``.bin`` (in that order of preference)."""
    infix = f".{variant}" if variant else ""
    candidates = [
        f"{stem}{infix}.safetensors",
        f"{stem}{infix}.safetensors.index.json",
        f"{stem}{infix}.bin",
        f"{stem}{infix}.bin.index.json",
    ]
    if not variant:
        candidates += [f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"]
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(_read_json(path)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_checkpoint(folder / shard)[0])
            return state
        return read_checkpoint(path)[0]
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(candidates)})")


def load_diffusers_folder(
    folder: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    *,
    parameterization: str | None = None,
    scale_factor: float | None = None,
    resolution: int | None = None,
    schedule: Mapping[str, Any] | None = None,
    variant: str | None = None,
) -> SDComponents:
    """Components of a diffusers Stable Diffusion folder.

    ``use_ema``: the released repos keep the EMA UNet as the default weights and the raw ones as the
    ``non_ema`` variant; ``use_ema=False`` takes that variant when present. ``variant`` picks another
    (e.g. ``"fp16"``). The scheduler config gives the schedule and parameterization; the VAE config the
    scale factor; the UNet ``sample_size`` times the VAE factor the resolution. Keyword arguments override.
    """
    root = Path(folder).expanduser()
    name = str(root)
    refiner = _check_pipeline(root)
    unet_cfg = _read_json(root / "unet" / "config.json")
    unet_config = unet_config_from_diffusers(unet_cfg)
    unet = _load_unet(root, unet_cfg, unet_config, use_ema, variant)
    vae_cfg = _read_json(root / "vae" / "config.json")
    vae_config = vae_config_from_diffusers(vae_cfg)
    try:
        vae_state = diffusers_vae_to_ldm(read_component_weights(root / "vae", variant=variant))
    except KeyError as err:
        raise ValueError(f"{name}/vae: {err.args[0]}") from None
    vae = load_strict(build_on_meta(AutoencoderKL, vae_config), vae_state, "VAE", f"{name}/vae")

    text_encoder, text_encoder_2 = _text_encoders(root, int(unet_config["context_dim"]), refiner)
    schedule_config, detected = _scheduler_config(root)
    factor = 2 ** (len(vae_config["ch_mult"]) - 1)
    components = SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        schedule=build_schedule({**schedule_config, **dict(schedule or {})}),
        parameterization=parameterization or detected,
        scale_factor=float(
            scale_factor if scale_factor is not None else vae_cfg.get("scaling_factor", 0.18215)
        ),
        version=version_of(unet_config, {"hidden_size": text_encoder.hidden_size}),
        resolution=int(resolution or int(unet_cfg.get("sample_size", 64)) * factor),
        text_encoder_2=text_encoder_2,
        refiner=refiner,
    )
    return finalize(components, dtype)


def _text_encoders(
    root: Path, context_dim: int, refiner: bool = False
) -> tuple[CLIPTextEncoder, PooledCLIPTextEncoder | None]:
    """``text_encoder/`` (+ ``text_encoder_2/`` for SDXL: both at the penultimate layer without the final
    layer norm; the refiner: ``text_encoder_2/`` alone, returned first); their widths must add up to the
    UNet's ``cross_attention_dim``."""
    if refiner:
        text_encoder = _pooled_bigg(root)
        if text_encoder.hidden_size != context_dim:
            raise ValueError(
                f"{root}: text_encoder_2 width {text_encoder.hidden_size} != UNet cross_attention_dim "
                f"{context_dim}"
            )
        return text_encoder, None
    if not (root / "text_encoder_2").is_dir():
        text_encoder = CLIPTextEncoder.from_pretrained(root)
        if text_encoder.hidden_size != context_dim:
            raise ValueError(
                f"{root}: text encoder width {text_encoder.hidden_size} != UNet cross_attention_dim "
                f"{context_dim}"
            )
        return text_encoder, None
    text_encoder = CLIPTextEncoder.from_pretrained(root, **_XL_TEXT_OPTIONS)
    text_encoder_2 = _pooled_bigg(root)
    widths = (text_encoder.hidden_size, text_encoder_2.hidden_size)
    if sum(widths) != context_dim:
        raise ValueError(
            f"{root}: text encoder widths {widths[0]} + {widths[1]} != UNet cross_attention_dim {context_dim}"
        )
    return text_encoder, text_encoder_2


_XL_TEXT_OPTIONS = {"layer": "penultimate", "final_layer_norm": False}


def _pooled_bigg(root: Path) -> PooledCLIPTextEncoder:
    """``text_encoder_2/`` + ``tokenizer_2/``: SDXL's pooled bigG (penultimate, no final layer norm)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    model = CLIPTextModelWithProjection.from_pretrained(str(root / "text_encoder_2"), local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True)
    return PooledCLIPTextEncoder(model.eval(), tokenizer, **_XL_TEXT_OPTIONS)


def _check_pipeline(root: Path) -> bool:
    """Whether the folder is an SDXL refiner; an error for folders that lack a part we load, and for an SDXL
    folder with text_encoder_2 alone that does not say it takes the aesthetic score (no known model)."""
    index = _read_json(root / "model_index.json")
    parts, refiner = ["unet", "vae", "text_encoder", "tokenizer"], False
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        refiner = not (index.get("text_encoder") or [None])[0]
        if refiner != bool(index.get("requires_aesthetics_score")):
            raise ValueError(
                f"{root}: model_index.json has text_encoder {index.get('text_encoder')} and "
                f"requires_aesthetics_score {index.get('requires_aesthetics_score')}; an SDXL refiner has "
                "text_encoder_2 alone and requires_aesthetics_score true, an SDXL base both text encoders "
                "and no aesthetic score. Fix model_index.json to the model it is."
            )
        parts = (
            ["unet", "vae", "text_encoder_2", "tokenizer_2"]
            if refiner
            else parts + ["text_encoder_2", "tokenizer_2"]
        )
    for part in parts:
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"{root} has no {part}/ folder: not a complete diffusers Stable Diffusion model"
            )
    return refiner


def _load_unet(
    root: Path,
    diffusers_config: Mapping[str, Any],
    config: Mapping[str, Any],
    use_ema: bool,
    variant: str | None,
) -> UNetModel:
    """The UNet; ``use_ema=False`` takes the ``non_ema`` weights when the folder has them."""
    name = str(root)
    unet_variant = variant
    if not use_ema and variant is None and any((root / "unet").glob("*.non_ema.*")):
        unet_variant = "non_ema"
        log.info(f"{name}: use_ema=False, loading the unet non_ema weights")
    try:
        unet_state = diffusers_unet_to_ldm(
            read_component_weights(root / "unet", variant=unet_variant), diffusers_config
        )
    except KeyError as err:
        raise ValueError(f"{name}/unet: {err.args[0]}") from None
    return load_strict(build_on_meta(UNetModel, config), unet_state, "UNet", f"{name}/unet")


def _scheduler_config(root: Path) -> tuple[dict[str, Any], str]:
    """(schedule config, parameterization) from ``scheduler/scheduler_config.json``, else SD's defaults."""
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        return schedule_from_diffusers(_read_json(scheduler_file))
    log.warning(f"{root}: no scheduler/scheduler_config.json; assuming SD's scaled_linear eps schedule")
    return {"kind": "scaled_linear", "linear_start": 0.00085, "linear_end": 0.012}, "eps"


def download_from_hub(
    repo_id: str,
    use_ema: bool = True,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local snapshot of a diffusers repo (only the parts we load; safetensors weights). With
    ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is used, and a miss is a fast clear ``OSError``."""
    from huggingface_hub import snapshot_download

    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    allow = [
        "model_index.json",
        "*/config.json",
        "*/*.txt",
        "tokenizer/*.json",
        "tokenizer_2/*.json",
        "scheduler/*.json",
        f"unet/{weights}",
        f"vae/{weights}",
        f"text_encoder/{weights}",
        f"text_encoder_2/{weights}",
        "*/*.safetensors.index.json",
    ]
    if not use_ema and not variant:
        allow.append("unet/*.non_ema.safetensors")
    ignore = [] if variant else ["*.fp16.*"]
    if use_ema or variant:
        ignore.append("*non_ema*")
    offline = hub_offline()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow,
            ignore_patterns=ignore,
            local_files_only=offline,
            cache_dir=os.fspath(cache_dir) if cache_dir else None,
        )
    except Exception as err:
        why = (
            "HF_HUB_OFFLINE=1, and the local Hugging Face cache does not hold it"
            if offline
            else f"it could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        )
        raise OSError(
            f"{repo_id!r} is not a local file or folder, so it was read as a Hugging Face Hub id, but {why}. "
            "Download it on a machine with network access "
            f"(e.g. `huggingface-cli download {repo_id}`) and pass "
            "the local folder, or pass a local .safetensors file"
            + ("" if offline else ", or check the id and your network")
            + "."
        ) from err
    return Path(path)
