"""LDM <-> diffusers / transformers names: the one place that knows how the layouts correspond.

* state dicts, diffusers -> LDM: ``diffusers_unet_to_ldm`` (``UNet2DConditionModel`` -> ``UNetModel``),
  ``diffusers_vae_to_ldm`` (``AutoencoderKL`` -> ``ldm.modules.vae.AutoencoderKL``); unknown keys raise.
  LDM -> diffusers (diffusers folder export): ``ldm_unet_to_diffusers``, ``ldm_vae_to_diffusers``.
* module names, LDM -> diffusers: ``unet_module_names`` (every Linear / Conv2d / LoRA layer of a UNet),
  ``text_encoder_module_names`` (CLIP encoder layers -> ``text_model.encoder.layers...``), used by the
  LoRA file formats (kohya ``lora_unet_<diffusers path>``, PEFT ``unet.<diffusers path>``).

UNet: LDM ``input_blocks`` = ``conv_in``, then per level ``num_res_blocks`` blocks and a Downsample;
``output_blocks`` = per level ``num_res_blocks + 1`` blocks, the last one ending in an Upsample;
``middle_block`` = (ResBlock, SpatialTransformer, ResBlock) = ``mid_block.resnets.0/attentions.0/resnets.1``.
A level without attention (diffusers' ``DownBlock2D``/``UpBlock2D``; SDXL's first) has blocks of a ResBlock
only, so its Upsample sits at position 1 instead of 2. SDXL's ``label_emb.0.0/0.2`` =
``add_embedding.linear_1/2``. Transformer internals (``transformer_blocks.*``, ``norm``, ``proj_in``,
``proj_out``) share their names, and tensors pass through unchanged (SD v1 1x1-conv and SD 2.x linear
``proj_in/out`` agree in both layouts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.adapters.lora import match_targets
from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet import Downsample, ResBlock, UNetModel, Upsample

__all__ = [
    "diffusers_unet_to_ldm",
    "diffusers_vae_to_ldm",
    "find_unet",
    "ldm_unet_to_diffusers",
    "ldm_vae_to_diffusers",
    "text_encoder_module_names",
    "unet_module_names",
]

# diffusers UNet2DConditionModel module -> LDM UNetModel module
_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's label embedding ("text_time")
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers ResnetBlock2D layer -> LDM ResBlock layer
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_TOP_LEVEL = {ldm: theirs for theirs, ldm in _UNET_TOP_LEVEL.items()}
_LDM_RESNET = {ldm: theirs for theirs, ldm in _RESNET.items()}


# ------------------------------------------------------------------------------------------ UNet state dicts


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
    for prefix, target in _UNET_TOP_LEVEL.items():
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


# ------------------------------------------------------------------------------------------ VAE state dicts


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def diffusers_vae_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM layout of ``ldm.modules.vae``.

    ``up_blocks`` count from the lowest resolution, LDM's ``decoder.up`` from the highest. Attention
    projections are Linear ``[C, C]`` in diffusers and 1x1 convs ``[C, C, 1, 1]`` here. Unknown keys raise.
    """
    num_up = 1 + max(
        (int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename_vae(key, num_up)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _rename_vae(key: str, num_up: int) -> str:
    if re.fullmatch(r"(quant_conv|post_quant_conv|(encoder|decoder)\.conv_(in|out))\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m and m[2] in _VAE_ATTENTION:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    raise KeyError(f"no LDM name for diffusers VAE key {key!r}")


# ------------------------------------------------------------------------------------------ module names


def find_unet(module: nn.Module) -> UNetModel:
    """``module`` itself if it is a ``UNetModel``, else its only ``UNetModel`` submodule."""
    if isinstance(module, UNetModel):
        return module
    found = [m for m in module.modules() if isinstance(m, UNetModel)]
    if len(found) != 1:
        raise TypeError(f"expected a UNetModel or a module holding exactly one, got {type(module).__name__}")
    return found[0]


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d / LoRA layers of ``model`` by qualified name (not the LoRA layers' insides)."""
    return {name: model.get_submodule(name) for name in match_targets(model, "*")}


def _ldm_to_diffusers(name: str, unet: UNetModel, layers: int) -> str:
    """One LDM UNet module name -> diffusers ``UNet2DConditionModel`` module name."""
    if name in _LDM_TOP_LEVEL:
        return _LDM_TOP_LEVEL[name]
    parts = name.split(".")

    def inner(block: nn.Module, position: int, rest: str, prefix: str, index: int) -> str:
        sub = block[position]
        if isinstance(sub, ResBlock) and rest in _LDM_RESNET:
            return f"{prefix}.resnets.{index}.{_LDM_RESNET[rest]}"
        if isinstance(sub, SpatialTransformer):
            return f"{prefix}.attentions.{index}.{rest}"
        if isinstance(sub, Downsample) and rest == "op":
            return f"{prefix}.downsamplers.0.conv"
        if isinstance(sub, Upsample) and rest == "conv":
            return f"{prefix}.upsamplers.0.conv"
        raise KeyError(name)

    if parts[0] in ("input_blocks", "output_blocks") and len(parts) >= 4:
        n, position, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        if parts[0] == "input_blocks":
            level, j = divmod(n - 1, layers + 1)
            return inner(unet.input_blocks[n], position, rest, f"down_blocks.{level}", j)
        level, j = divmod(n, layers + 1)
        return inner(unet.output_blocks[n], position, rest, f"up_blocks.{level}", j)
    if parts[0] == "middle_block" and len(parts) >= 3:
        position, rest = int(parts[1]), ".".join(parts[2:])
        # middle_block = (ResBlock, SpatialTransformer, ResBlock) = resnets.0, attentions.0, resnets.1
        return inner(unet.middle_block, position, rest, "mid_block", position // 2)
    raise KeyError(name)


def unet_module_names(unet: nn.Module) -> dict[str, str]:
    """``{LDM module name: diffusers module name}`` for every Linear / Conv2d (or LoRA layer) of
    ``unet`` (a ``UNetModel`` or a module holding one; names are relative to the ``UNetModel``).

    The mapping depends on the configuration, which is read from the module: the number of levels
    (Downsample count + 1) and ``num_res_blocks`` (``len(input_blocks) = levels * (num_res_blocks+1)``).
    """
    unet = find_unet(unet)
    levels = 1 + sum(isinstance(m, Downsample) for m in unet.input_blocks.modules())
    layers = len(unet.input_blocks) // levels - 1
    if levels * (layers + 1) != len(unet.input_blocks) or len(unet.output_blocks) != len(unet.input_blocks):
        raise ValueError("UNet layout is not the LDM one (input/output block counts disagree)")
    out = {}
    for name in _adaptable_modules(unet):
        try:
            out[name] = _ldm_to_diffusers(name, unet, layers)
        except (KeyError, IndexError, ValueError) as err:
            raise KeyError(f"no diffusers name for UNet module {name!r}") from err
    return out


def text_encoder_module_names(text_encoder: nn.Module) -> dict[str, str]:
    """``{module name: transformers CLIP path}`` for the Linear layers of a CLIP text encoder's
    transformer layers (``CLIPTextEncoder``, its ``.transformer``, or a ``CLIPTextModel`` of
    transformers 4 or 5): ``...encoder.layers.3.mlp.fc1`` -> ``text_model.encoder.layers.3.mlp.fc1``."""
    out = {}
    for name in _adaptable_modules(text_encoder):
        index = name.find("encoder.layers.")
        if index == 0 or (index > 0 and name[index - 1] == "."):
            out[name] = "text_model." + name[index:]
    if not out:
        raise ValueError(f"no CLIP encoder layers (`encoder.layers.N`) in {type(text_encoder).__name__}")
    return out


# ------------------------------------------------------------------------------------------ LDM -> diffusers


def ldm_unet_to_diffusers(state: Mapping[str, torch.Tensor], unet: UNetModel) -> dict[str, torch.Tensor]:
    """Inverse of ``diffusers_unet_to_ldm`` for the UNet ``unet`` whose state dict ``state`` is: every key's
    module renamed as ``unet_module_names`` does, the parameter name kept. Checked by mapping back."""
    levels = 1 + sum(isinstance(m, Downsample) for m in unet.input_blocks.modules())
    layers = len(unet.input_blocks) // levels - 1
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        try:
            out[f"{_ldm_to_diffusers(module, unet, layers)}.{param}"] = value
        except (KeyError, IndexError) as err:
            raise KeyError(f"no diffusers name for UNet key {key!r}") from err
    back = diffusers_unet_to_ldm(out, {"layers_per_block": layers})
    if set(back) != set(state):
        raise KeyError(f"UNet names do not map back: {sorted(set(state) ^ set(back))[:5]}")
    return out


_LDM_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_vae_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``diffusers_vae_to_ldm`` (diffusers' current names: ``to_q`` ..., ``group_norm``; the
    attention projections as Linear ``[C, C]``). Checked by mapping back."""
    num_up = 1 + max((int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in state.items():
        new = _vae_name_to_diffusers(key, num_up)
        if (
            re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", new)
            and value.ndim == 4
        ):
            value = value[:, :, 0, 0]
        out[new] = value
    back = diffusers_vae_to_ldm(out)
    if set(back) != set(state):
        raise KeyError(f"VAE names do not map back: {sorted(set(state) ^ set(back))[:5]}")
    return out


def _vae_name_to_diffusers(key: str, num_up: int) -> str:
    if re.fullmatch(r"(quant_conv|post_quant_conv|(encoder|decoder)\.conv_(in|out))\.(weight|bias)", key):
        return key
    resnet = {"nin_shortcut": "conv_shortcut"}
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{resnet.get(m[3], m[3])}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
    if m and m[2] in _LDM_VAE_ATTENTION:
        return f"{m[1]}.mid_block.attentions.0.{_LDM_VAE_ATTENTION[m[2]]}.{m[3]}"
    raise KeyError(f"no diffusers name for VAE key {key!r}")
