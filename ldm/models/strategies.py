"""What sharded strategies wrap: the UNet's repeated blocks (FSDP auto-wrap and activation checkpointing
units)."""

from __future__ import annotations

from torch import nn

from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.unet import ResBlock


def unet_block_classes() -> set[type[nn.Module]]:
    """ResBlocks and transformer blocks: each becomes one FSDP unit (its parameters gathered only while it
    runs) and, with activation checkpointing, one recomputed segment."""
    return {ResBlock, BasicTransformerBlock}
