"""OpenCLIP text towers <-> the transformers CLIP layout (``text_model.*``) of ``CLIPTextEncoder``: SD 2.x's
ViT-H (``cond_stage_model.model.*`` in single files) and SDXL's ViT-bigG (``conditioner.embedders.1.model.*``,
whose ``text_projection`` [width, proj] is the transpose of HF's ``text_projection.weight``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["hf_to_openclip", "hf_to_openclip_projected", "openclip_to_hf", "openclip_to_hf_projected"]

_OPENCLIP_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


_OPENCLIP_IGNORED = ("text_projection", "logit_scale", "attn_mask")


def openclip_to_hf(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (``cond_stage_model.model.*`` without the prefix) -> HF ``text_model.*``.

    ``in_proj_weight`` [3C, C] splits into q/k/v. SD 2.x conditions on the penultimate of 24 layers, so with
    ``num_layers=23`` (the diffusers layout) the last block is dropped; ``ln_final`` becomes
    ``final_layer_norm`` (SD2 applies it to the penultimate output). Unknown keys are kept, unrenamed, so the
    strict check reports them.
    """
    blocks = {int(m[1]) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    drop_last = len(blocks) == num_layers + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _OPENCLIP_IGNORED:
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key):
            index, name, param = int(m[1]), m[2], m[3]
            if drop_last and index == num_layers:
                continue
            out[f"text_model.encoder.layers.{index}.{_OPENCLIP_TO_HF.get(name, name)}.{param}"] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            index, param = int(m[1]), m[2]
            if drop_last and index == num_layers:
                continue
            layer = f"text_model.encoder.layers.{index}.self_attn."
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{layer}{part}_proj.{param}"] = chunk
        else:
            out[key] = value
    return out


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``openclip_to_hf`` (keys without ``cond_stage_model.model.``); q/k/v fuse into in_proj."""
    hf_to_oc = {v: k for k, v in _OPENCLIP_TO_HF.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            index, name, param = m[1], m[2], m[3]
            if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", name):
                fused.setdefault(f"transformer.resblocks.{index}.attn.in_proj_{param}", {})[qkv[1]] = value
            else:
                out[f"transformer.resblocks.{index}.{hf_to_oc[name]}.{param}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openclip_to_hf_projected(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SDXL's bigG (OpenCLIP names, without the prefix) -> a ``CLIPTextModelWithProjection`` state dict: every
    block kept, ``text_projection`` [width, proj] -> ``text_projection.weight`` [proj, width]. A file without
    ``text_projection`` leaves it missing (the strict load names it)."""
    rest = {k: v for k, v in state.items() if k != "text_projection"}
    out = openclip_to_hf(rest, num_layers)
    if "text_projection" in state:
        out["text_projection.weight"] = state["text_projection"].t().contiguous()
    return out


def hf_to_openclip_projected(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``openclip_to_hf_projected``: OpenCLIP names with ``text_projection`` [width, proj]."""
    rest = {k: v for k, v in state.items() if k != "text_projection.weight"}
    out = hf_to_openclip(rest)
    if "text_projection.weight" not in state:
        raise KeyError("the pooled text encoder has no text_projection.weight")
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    return out
