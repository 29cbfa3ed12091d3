"""Rename a diffusers ``UNet2DConditionModel`` state dict to LDM ``UNetModel`` names.

Covers the Stable Diffusion v1/v2 layout (CrossAttn/plain down and up blocks, a cross-attention
mid block). Tensors are passed through unchanged: the layouts agree for SD v1 (1x1-conv
``proj_in/out``) and SD 2.x (linear ``proj_in/out``). Unknown keys raise ``KeyError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet_param(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_RESNET[layer]}.{param}"


def diffusers_unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Map diffusers UNet keys to LDM keys (without the ``model.diffusion_model.`` prefix).

    ``config``: the diffusers model config (``unet.config``); ``layers_per_block`` is read from it.
    Transformer internals (``transformer_blocks.*``, ``norm``, ``proj_in``, ``proj_out``) share
    their names between the two layouts.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"per-block layers_per_block {layers} is not an LDM layout")
        layers = layers[0]
    up_has_attention = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    return {_rename(key, layers, up_has_attention): value for key, value in state_dict.items()}


def _rename(key: str, layers: int, up_has_attention: set[int]) -> str:
    for prefix, target in _TOP_LEVEL.items():
        if key.startswith(prefix + "."):
            return target + key[len(prefix) :]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        # input_blocks: conv_in, then per level `layers` blocks and a Downsample;
        # output_blocks: per level `layers + 1` blocks, the last one ending in an Upsample.
        if side == "down":
            block = f"input_blocks.{1 + level * (layers + 1) + j}"
        else:
            block = f"output_blocks.{level * (layers + 1) + j}"
        return f"{block}.0.{_resnet_param(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        position = 2 if level in up_has_attention else 1
        return f"output_blocks.{level * (layers + 1) + layers}.{position}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_param(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise KeyError(f"no LDM name for diffusers key {key!r}")


def diffusers_config_from_ldm(
    in_channels: int = 4,
    out_channels: int = 4,
    model_channels: int = 320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks: int = 2,
    attention_resolutions=(4, 2, 1),
    num_heads: int = 8,
    num_head_channels: int = -1,
    transformer_depth: int = 1,
    context_dim: int | None = 768,
    use_linear_in_transformer: bool = False,
    use_scale_shift_norm: bool = False,
    **_ignored,
) -> dict:
    """``UNet2DConditionModel(**config)`` kwargs for the architecture of ``UNetModel(**kwargs)``.

    diffusers' ``attention_head_dim`` is (for historical reasons) the number of heads.
    """
    with_attention = [2**level in attention_resolutions for level in range(len(channel_mult))]
    widths = [model_channels * m for m in channel_mult]
    heads = [w // num_head_channels if num_head_channels > 0 else num_heads for w in widths]
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": tuple(widths),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
        "layers_per_block": num_res_blocks,
        "attention_head_dim": heads if num_head_channels > 0 else num_heads,
        "transformer_layers_per_block": transformer_depth,
        "cross_attention_dim": context_dim,
        "use_linear_projection": use_linear_in_transformer,
        "resnet_time_scale_shift": "scale_shift" if use_scale_shift_norm else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    }
