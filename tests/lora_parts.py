"""Shared by the LoRA tests (test_lora_*.py): the tiny UNet configs (SD1- and SD2-style attention), randomised
models and LoRA weights, and their outputs. The text encoder fixtures (``tiny_te``, ``te``) are
conftest.py's."""

from __future__ import annotations

import copy

import torch

from ldm.modules.adapters import (
    TEXT_ENCODER_ALL,
    UNET_TRANSFORMER,
    inject_lora,
    lora_modules,
)
from ldm.modules.tiny_unet import tiny_unet_config
from ldm.modules.unet import UNetModel

# conf/model/unet/tiny.yaml: levels (1, 2), one ResBlock per level, attention at the 2x level only.
TINY = tiny_unet_config()
TINY_SD2 = {**TINY, "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}
PROMPTS = ["a red circle on a blue background", "a sks square"]


def make_unet(config=TINY, seed=0) -> UNetModel:
    """Tiny UNet with every parameter randomised (so zero-initialised layers carry signal)."""
    unet = UNetModel(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet.eval()


def unet_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.tensor([10, 700]),
        torch.randn(2, 5, 64, generator=gen),
    )


@torch.no_grad()
def unet_out(unet):
    return unet(*unet_inputs())


@torch.no_grad()
def randomize_lora(model, seed=1, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_modules(model).values():
        for p in (layer.lora_down.weight, layer.lora_up.weight):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


def te_out(te):
    with torch.no_grad():
        return te(PROMPTS)


def lora_pair(te, config=TINY, rank=4, alpha=2.0, unet_targets=UNET_TRANSFORMER, seed=1):
    """(unet, text encoder) with random LoRA weights, and deep copies of their bases."""
    unet = make_unet(config)
    base_unet, base_te = copy.deepcopy(unet), copy.deepcopy(te)
    inject_lora(unet, unet_targets, rank=rank, alpha=alpha)
    inject_lora(te, TEXT_ENCODER_ALL, rank=rank, alpha=alpha)
    randomize_lora(unet, seed)
    randomize_lora(te, seed + 100)
    return unet, te, base_unet, base_te


# Written by hand from the diffusers layout of the tiny config (down_blocks.0 has no attention,
# down_blocks.1.attentions.0 = input_blocks.3.1, mid_block.attentions.0 = middle_block.1,
