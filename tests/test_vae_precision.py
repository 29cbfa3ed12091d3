"""Under trainer.precision=bf16-mixed the UNet runs in bf16 but the VAE keeps its weights' precision (fp32):
latents to train on and decoded images are the same as without autocast."""

from __future__ import annotations

import torch
from hydra.utils import instantiate


def test_vae_runs_in_fp32_under_bf16_autocast(compose_cfg):
    cfg = compose_cfg(
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            "model.scale_factor=0.5",
        ]
    )
    model = instantiate(cfg.model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = model.vae_encode(images).mean
    decoded = model.decode_latents(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.vae.encode(images).mean.dtype == torch.bfloat16  # what autocast alone would do
        latents = model.vae_encode(images).mean
        images_back = model.decode_latents(latents)
    assert latents.dtype == torch.float32 and torch.equal(latents, reference)
    assert images_back.dtype == torch.float32 and torch.equal(images_back, decoded)
