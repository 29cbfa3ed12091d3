"""Text encoder offloaded after caching: once every prompt a run will use is in the frozen encoder's prompt
cache (``CLIPTextEncoder.encode_cached``), the encoder's weights leave the accelerator, so a fine-tune with
cached latents holds neither the VAE encoder's work nor the text encoder in accelerator memory
(``model.offload_text_encoder=true``). A prompt missing from the cache is still encoded, on the CPU."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ldm.utils.logging import get_logger

__all__ = ["cache_prompts_and_offload"]

log = get_logger(__name__)


def cache_prompts_and_offload(
    encoder: nn.Module, prompts: Iterable[str], device: str | torch.device = "cpu", batch_size: int = 64
) -> int:
    """Encode every distinct prompt of ``prompts`` into ``encoder``'s prompt cache (where it is now), then
    move ``encoder`` to ``device``; returns the number of cached prompts. The cache grows to hold them all
    (~ max_length x hidden floats each, in CPU memory)."""
    if not getattr(encoder, "cache_enabled", False):
        raise ValueError(
            "model.offload_text_encoder=true needs a frozen text encoder with a prompt cache; this run "
            "trains the text encoder (textual inversion, LoRA on the text encoder, DreamBooth with "
            "train_text_encoder): set model.offload_text_encoder=false"
        )
    unique = list(dict.fromkeys(prompts))
    if encoder.cache_size is not None and len(unique) > encoder.cache_size:
        encoder.cache_size = len(unique)
    for start in range(0, len(unique), batch_size):
        encoder.encode_cached(unique[start : start + batch_size])
    encoder.to(device)
    log.info(f"Text encoder: {len(unique)} prompts cached, weights moved to {device}")
    return len(unique)
