"""``SDComponents``: the parts of a text-to-image latent diffusion model, as every base-model loader
returns them."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ldm.diffusion import DiffusionSchedule
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL

__all__ = ["SDComponents", "as_dtype", "finalize"]


@dataclasses.dataclass
class SDComponents:
    """The parts of a text-to-image latent diffusion model, ready to use or fine-tune.

    All modules are in eval mode; the UNet's parameters require grad, the VAE's and the text encoder's
    do not. ``version``: ``"v1"``, ``"v2"`` or ``"custom"`` (any other architecture, e.g. our own models).
    ``resolution``: the native image size (512 for v1 / v2-base, 768 for v2-v).
    """

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    schedule: DiffusionSchedule
    parameterization: str
    scale_factor: float
    version: str
    resolution: int = 512
    # the whole conditioner when the model has more than the one text encoder (SDXL: two text embedders + the
    # size embedders; ``text_encoder`` is then its first text embedder); None: ``Conditioner([text_encoder])``
    conditioner: Any = None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        for module in (self.unet, self.vae, self.conditioner or self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


def as_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``torch.float16`` | ``"fp16"`` | ``"float16"`` | ``"bf16"`` | ... -> torch.dtype (None -> default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower().removeprefix("torch."))
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ValueError(f"not a floating point dtype: {dtype!r}")
    return result


def finalize(components: SDComponents, dtype: torch.dtype | str | None) -> SDComponents:
    """Cast to ``dtype`` (default float32), eval mode, UNet trainable, VAE and text encoder frozen."""
    target = as_dtype(dtype)
    components.unet.to(dtype=target).eval().requires_grad_(True)
    components.vae.to(dtype=target).eval().requires_grad_(False)
    if components.conditioner is not None:
        components.conditioner.to(dtype=target).eval().requires_grad_(False)
    texts = getattr(components.conditioner, "text_embedders", None) or [components.text_encoder]
    for text in texts:
        text.to(dtype=target)
        if hasattr(text, "freeze"):
            text.freeze()
        else:
            text.eval().requires_grad_(False)
        if hasattr(text, "clear_cache"):
            text.clear_cache()
    return components
