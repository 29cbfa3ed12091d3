"""Key layout of a Stable Diffusion single file (the original LDM names)::

    model.diffusion_model.*                      UNet           -> ldm.modules.unet.UNetModel (same names)
    first_stage_model.*                          VAE (kl-f8)    -> ldm.modules.vae.AutoencoderKL (same names)
    cond_stage_model.transformer.text_model.*    SD v1 CLIP     -> CLIPTextEncoder.transformer.text_model.*
    cond_stage_model.model.*                     SD v2 OpenCLIP -> converted to the HF CLIP layout (23 layers)
    conditioner.embedders.0.transformer.*        SDXL CLIP-L    -> as SD v1 CLIP (``text_model.*``)
    conditioner.embedders.1.model.*              SDXL bigG      -> OpenCLIP names -> HF layout (+ projection)
    conditioner.embedders.0.model.*              SDXL refiner's bigG (its only text encoder) -> as SDXL bigG
    model_ema.<name without dots>                EMA UNet (``model_ema.diffusion_modelinput_blocks00weight``)
    betas, alphas_cumprod, ...                   schedule buffers (used when they differ from the preset)

Splitting a file into these groups, and telling SD v1 from v2 from SDXL base from the SDXL refiner (and eps
from v) by the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.utils.logging import get_logger

__all__ = [
    "CLIP_PREFIX",
    "EMA_PREFIX",
    "OPENCLIP_PREFIX",
    "SCHEDULE_BUFFERS",
    "SDXL_CLIP_PREFIX",
    "SDXL_OPENCLIP_PREFIX",
    "SDXL_REFINER_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "detect_version",
    "ema_key",
    "guess_v2_parameterization",
    "split_single_file",
]

log = get_logger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # + text_model.*  (SD v1)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD v2
EMA_PREFIX = "model_ema."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.*  (SDXL base CLIP-L)
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base OpenCLIP bigG
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: bigG only

SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
    "v_pred",
    "ztsnr",
}


def ema_key(unet_key: str) -> str:
    """LitEma's name of UNet parameter ``unet_key``: ``model_ema.`` + ``diffusion_model.<key>`` sans dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_single_file(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group a single-file state dict: ``unet``, ``ema`` (raw ``model_ema.*`` names), ``vae``, ``clip``
    (``text_model.*``; SD v1's or SDXL's CLIP-L), ``openclip`` (SD v2's OpenCLIP names), ``clip_g`` (SDXL's
    bigG or the refiner's, OpenCLIP names), ``extra`` (schedule buffers). Unknown keys raise."""
    groups: dict[str, dict[str, torch.Tensor]] = {
        g: {} for g in ("unet", "ema", "vae", "clip", "openclip", "clip_g", "extra")
    }
    unknown = []
    base_xl = any(k.startswith((SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX)) for k in state)
    bigg = SDXL_OPENCLIP_PREFIX if base_xl else SDXL_REFINER_PREFIX  # a refiner's bigG is embedder 0
    for key, value in state.items():
        if key.startswith(SDXL_CLIP_PREFIX):
            key = CLIP_PREFIX + key[len(SDXL_CLIP_PREFIX) :]
        elif key.startswith(bigg):
            groups["clip_g"][key[len(bigg) :]] = value
            continue
        if key in SCHEDULE_BUFFERS:
            groups["extra"][key] = value
        elif key.startswith(UNET_PREFIX):
            groups["unet"][key[len(UNET_PREFIX) :]] = value
        elif key.startswith(EMA_PREFIX):
            groups["ema"][key] = value
        elif key.startswith(VAE_PREFIX + "loss."):
            continue  # the VAE training loss (LPIPS, discriminator) of unpruned files
        elif key.startswith(VAE_PREFIX):
            groups["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(CLIP_PREFIX):
            name = key[len(CLIP_PREFIX) :]
            if not name.startswith("text_model."):  # transformers < 4.? wrote no text_model level
                name = "text_model." + name
            if not name.endswith("position_ids"):
                groups["clip"][name] = value
        elif key.startswith(OPENCLIP_PREFIX):
            groups["openclip"][key[len(OPENCLIP_PREFIX) :]] = value
        else:
            unknown.append(key)
    if unknown:
        what = (
            "conditioner keys other than SDXL base's two text encoders or the refiner's one"
            if any(k.startswith("conditioner.") for k in unknown)
            else "not a Stable Diffusion v1/v2/XL single file"
        )
        raise ValueError(
            f"{source}: {len(unknown)} keys outside the Stable Diffusion layout ({what}), e.g. "
            + ", ".join(f"{k} {list(state[k].shape)}" for k in unknown[:5])
        )
    if not groups["unet"] and not groups["ema"]:
        prefixes = sorted({k.split(".")[0] for k in state})[:10]
        raise ValueError(
            f"{source}: no model.diffusion_model.* keys, so not a Stable Diffusion checkpoint "
            f"(top-level names: {prefixes})"
        )
    return groups


def detect_version(state: Mapping[str, torch.Tensor]) -> str:
    """``"v1"``, ``"v2"``, ``"sdxl"`` (base) or ``"sdxl_refiner"`` from the keys (conditioner text towers,
    OpenCLIP text tower, label embedding, linear proj_in, 1024-wide context)."""
    if any(k.startswith(SDXL_REFINER_PREFIX) for k in state):
        return "sdxl_refiner"
    if any(k.startswith((SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX)) for k in state):
        return "sdxl"
    label = state.get(UNET_PREFIX + "label_emb.0.0.weight")
    if label is not None:
        return "sdxl_refiner" if label.shape[-1] == 2560 else "sdxl"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        return "v2"
    to_k = state.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = state.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    if (to_k is not None and to_k.shape[-1] == 1024) or (proj_in is not None and proj_in.ndim == 2):
        return "v2"
    return "v1"


def guess_v2_parameterization(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
) -> str:
    """eps (512-base) and v (768-v) SD2 files have the same tensors: use markers, else the file name."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v"
    if spec in ("epsilon", "eps"):
        return "eps"
    if "v_pred" in state:
        return "v"
    name = Path(source).name.lower()
    if re.search(r"768|v[-_]?pred", name):
        return "v"
    if re.search(r"512|base|eps", name):
        return "eps"
    log.warning(
        f"{source}: SD 2.x 512-base (eps) and 768-v (v-prediction) files cannot be told apart from "
        "their weights; assuming v-prediction at 768 px. Pass preset='v2' (or parameterization='eps') "
        "for a 512-base model."
    )
    return "v"
