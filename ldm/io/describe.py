"""Describe built modules by the config that rebuilds them (``UNetModel(**describe_unet(unet))``, ...):
what our single-file exports store as ``ldm.config`` metadata, so a file loads back without presets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.diffusion import OUR_CONVENTION, DiffusionSchedule
from ldm.io.sd_presets import SD_SCHEDULE, TEXT_CONFIG_FIELDS
from ldm.modules.attention import SpatialTransformer
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.unet import Downsample, ResBlock, UNetModel, depth_kwargs
from ldm.modules.vae import AutoencoderKL

__all__ = ["build_schedule", "describe_schedule", "describe_text_encoder", "describe_unet", "describe_vae"]


def describe_unet(unet: UNetModel) -> dict[str, Any]:
    """``UNetModel(**describe_unet(unet))`` rebuilds the architecture of ``unet``."""
    widths, per_level, attention, depths = [], [0], set(), [0]
    transformers: list[SpatialTransformer] = []
    ds = 1
    for block in list(unet.input_blocks)[1:]:
        if isinstance(block[0], Downsample):
            per_level.append(0)
            depths.append(0)
            ds *= 2
            continue
        if not isinstance(block[0], ResBlock):
            raise TypeError(f"unexpected input block {type(block[0]).__name__}")
        if per_level[-1] == 0:
            widths.append(block[0].out_layers[3].out_channels)
        per_level[-1] += 1
        if len(block) > 1:
            attention.add(ds)
            transformers.append(block[1])
            depths[-1] = len(block[1].transformer_blocks)
    transformers.append(unet.middle_block[1])
    if len(set(per_level)) != 1:
        raise ValueError(f"uneven res blocks per level {per_level}")
    blocks = [b for t in transformers for b in t.transformer_blocks]
    heads = {b.attn1.heads for b in blocks}
    dims = {b.attn1.dim_head for b in blocks}
    if len(heads) == 1:
        num_heads, num_head_channels = heads.pop(), -1
    elif len(dims) == 1:
        num_heads, num_head_channels = -1, dims.pop()
    else:
        raise ValueError("attention heads vary in both count and width; no UNetModel config describes that")
    first = unet.input_blocks[1][0]
    return {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "channel_mult": [w // unet.model_channels for w in widths],
        "num_res_blocks": per_level[0],
        "attention_resolutions": sorted(attention, reverse=True),
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        **depth_kwargs(depths, len(unet.middle_block[1].transformer_blocks)),
        "context_dim": unet.context_dim,
        "use_linear_in_transformer": bool(transformers[0].use_linear),
        "use_checkpoint": False,
        "dropout": float(first.out_layers[2].p),
        "use_scale_shift_norm": bool(first.use_scale_shift_norm),
        **({} if unet.adm_in_channels is None else {"adm_in_channels": unet.adm_in_channels}),
    }


def describe_vae(vae: AutoencoderKL) -> dict[str, Any]:
    """``AutoencoderKL(**describe_vae(vae))`` rebuilds the architecture of ``vae`` (at resolution 256)."""
    encoder = vae.encoder
    ch = encoder.conv_in.out_channels
    groups = max(m.num_groups for m in vae.modules() if isinstance(m, nn.GroupNorm))
    return {
        "embed_dim": vae.embed_dim,
        "ch": ch,
        "ch_mult": [level.block[-1].conv2.out_channels // ch for level in encoder.down],
        "num_res_blocks": len(encoder.down[0].block),
        "in_channels": encoder.conv_in.in_channels,
        "out_ch": vae.decoder.conv_out.out_channels,
        "z_channels": vae.post_quant_conv.out_channels,
        "attn_resolutions": [256 // 2**i for i, level in enumerate(encoder.down) if len(level.attn)],
        "resolution": 256,
        "dropout": float(encoder.down[0].block[0].dropout.p),
        "norm_groups": groups,
    }


def describe_text_encoder(text_encoder: CLIPTextEncoder) -> dict[str, Any]:
    """CLIPTextConfig fields of the text tower plus the encoder options (max_length, layer, ...)."""
    config = text_encoder.transformer.config
    described = {name: getattr(config, name) for name in TEXT_CONFIG_FIELDS}
    described.update(
        max_length=text_encoder.max_length,
        layer=text_encoder.layer,
        final_layer_norm=text_encoder.final_layer_norm,
    )
    return described


def describe_schedule(schedule: DiffusionSchedule) -> dict[str, Any]:
    """A ``DiffusionSchedule.from_config`` dict when ``schedule`` is a standard one, else its betas."""
    for kind in ("scaled_linear", "linear"):
        config = {
            **SD_SCHEDULE,
            "kind": kind,
            "num_timesteps": schedule.num_timesteps,
            **schedule.convention.as_config(),
        }
        if torch.allclose(
            DiffusionSchedule.from_config(**config).betas, schedule.betas, rtol=1e-6, atol=1e-9
        ):
            return config
    return {"betas": [float(b) for b in schedule.betas], **schedule.convention.as_config()}


def build_schedule(config: Mapping[str, Any]) -> DiffusionSchedule:
    config = dict(config)
    if "betas" in config:
        convention = OUR_CONVENTION.replace(
            config.get("timestep_spacing"), config.get("steps_offset"), config.get("set_alpha_to_one")
        )
        return DiffusionSchedule(torch.tensor(config["betas"], dtype=torch.float64), convention)
    return DiffusionSchedule.from_config(**config)
