"""The services a latent-diffusion model hands its datamodule (``ldm.utils.data_handover.DataServices``): the
VAE encoder for the latent cache, a class-image generator for DreamBooth, and digests of the weights behind
each (the caches' keys). Functions of the model, so the datamodule never holds the model itself."""

from __future__ import annotations

import hashlib
from functools import cache

import torch
from torch import nn

from ldm.utils.data_handover import DataServices


def data_services(model) -> DataServices:
    """``model`` (a ``LatentDiffusion`` with its weights loaded) as ``DataServices``. The fingerprints are
    computed on first use (hashing a VAE costs a fraction of a second, and only a cache needs it)."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = model.vae_encode(images.to(model.device))
        return posterior.mean, posterior.std

    def generate(
        prompts: list[str],
        seeds: list[int],
        *,
        sampler: str,
        steps: int,
        guidance_scale: float,
        resolution: int,
    ) -> torch.Tensor:
        from ldm.diffusion import build_sampler

        factor = getattr(model.vae, "downsample_factor", 8)
        was_training = model.training
        model.eval()
        # one per image: batch-independent
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        try:
            return model.generate(
                prompts,
                guidance_scale=guidance_scale,
                generator=generators,
                sampler=build_sampler(sampler, steps=steps),
                use_ema=False,
                latent_size=resolution // factor,
            )
        finally:
            model.train(was_training)

    return DataServices(
        encode=encode,
        vae_fingerprint=cache(lambda: vae_encoder_fingerprint(model.vae)),
        generate=generate,
        base_fingerprint=cache(
            lambda: module_fingerprint(model.unet, model.vae, *model.conditioner.text_embedders)
        ),
        device=model.device,
    )


def vae_encoder_fingerprint(vae: nn.Module) -> str:
    """SHA-1 of every weight that shapes the cached latents (the encoder side of the VAE), in full."""
    digest = hashlib.sha1()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("decoder.", "post_quant_conv.")):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def module_fingerprint(*modules: nn.Module) -> str:
    """A short digest of the modules' weights (names, shapes and the first values of every tensor): the base
    model's identity in the class-image cache key."""
    digest = hashlib.sha1()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().cpu().flatten()[:64].numpy().tobytes())
    return digest.hexdigest()[:16]
