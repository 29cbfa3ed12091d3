"""The single-file key layout of a released Stable Diffusion model (names and shapes, no weights)."""

from __future__ import annotations

import torch

from ldm.io.openclip import hf_to_openclip, hf_to_openclip_projected
from ldm.io.sd_presets import PRESETS
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL


def released_layout(version: str, preset: dict | None = None) -> dict[str, torch.Tensor]:
    """The single-file state dict of a released model (``"v1"``, ``"v2"``, ``"sdxl"`` or ``"sdxl_refiner"``
    preset), as meta tensors; ``preset``: that preset changed (e.g. a narrower UNet), in the same layout."""
    preset = preset or PRESETS[version]
    with torch.device("meta"):
        unet, vae = UNetModel(**preset["unet"]), AutoencoderKL(**preset["vae"])
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    if version == "sdxl_refiner":
        bigg = PooledCLIPTextEncoder.from_config(
            preset["text_encoder"], device="meta"
        ).transformer.state_dict()
        state.update(
            {f"conditioner.embedders.0.model.{k}": v for k, v in hf_to_openclip_projected(bigg).items()}
        )
        return state
    text = CLIPTextEncoder.from_config(preset["text_encoder"], device="meta").transformer.state_dict()
    if version == "sdxl":
        bigg = PooledCLIPTextEncoder.from_config(
            preset["text_encoder_2"], device="meta"
        ).transformer.state_dict()
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()})
        state.update(
            {f"conditioner.embedders.1.model.{k}": v for k, v in hf_to_openclip_projected(bigg).items()}
        )
    elif version == "v1":
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    else:
        state.update({f"cond_stage_model.model.{k}": v for k, v in hf_to_openclip(text).items()})
    return state
