"""The test-sized UNet preset (1.0M parameters: two levels, cross-attention at the 2x-downsampled level, 8x8
latents in milliseconds). One definition: the tiny random base of a ``trainer.fast_dev_run`` fine-tune and
the tests build from it, each changing only what it needs (attention levels, heads, context width);
``conf/model/unet/tiny.yaml`` carries the same values for Hydra (``tests/test_tiny_unet.py`` checks it)."""

from __future__ import annotations

from typing import Any

from ldm.modules.unet import UNetModel

TINY_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "num_heads": 4,
    "num_head_channels": -1,
    "transformer_depth": 1,
    "context_dim": 64,
    "use_linear_in_transformer": False,
    "use_checkpoint": False,
    "dropout": 0.0,
    "use_scale_shift_norm": False,
}


def tiny_unet_config(**changes: Any) -> dict[str, Any]:
    """``UNetModel`` keyword arguments of the tiny preset with ``changes`` (UNetModel's own names) applied."""
    unknown = sorted(set(changes) - set(TINY_UNET) - {"transformer_depth_middle", "adm_in_channels"})
    if unknown:
        raise TypeError(f"tiny_unet_config: {unknown} are not UNetModel arguments")
    return {**TINY_UNET, **changes}


def tiny_unet(**changes: Any) -> UNetModel:
    """The tiny preset's UNet (randomly initialised; seed torch first for a reproducible one)."""
    return UNetModel(**tiny_unet_config(**changes))
