"""Sampling and image logging of ``LatentDiffusion``: the EMA scope, ``generate`` (classifier-free guidance
over any ``ldm.diffusion`` sampler, then the VAE decoder) and the fixed-prompt grids of ``log_images``.

A mixin: it reads the model's parts (``unet``, ``vae``, ``conditioner``, ``schedule``, ``sampler``,
``unet_ema``) and methods (``conditions``, ``context_of``, ``decode_latents``) from ``LatentDiffusion``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ldm.diffusion import classifier_free_guidance
from ldm.models.micro_conditions import negative_batch, sampling_batch


class LatentDiffusionSampling:
    """``LatentDiffusion``'s sampling methods (see the module docstring)."""

    @contextlib.contextmanager
    def ema_scope(self):
        """Temporarily use the EMA UNet (for validation, sampling and export)."""
        if self.unet_ema is None:
            yield self.unet
            return
        live = self.unet
        self.unet = self.unet_ema.module
        try:
            yield self.unet
        finally:
            self.unet = live

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        guidance_scale: float | None = None,
        seed: int = 0,
        sampler: Callable | None = None,
        negative_prompt: str | Sequence[str] = "",
        use_ema: bool = True,
        progress: bool = False,
        latent_size: int | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
        callback: Callable | None = None,
        sizes: dict | None = None,
    ) -> torch.Tensor:
        """prompts -> images [B, 3, H, W] in [-1, 1]. Seeded: the same seed gives the same images.

        ``negative_prompt``: one for all, or one per prompt. ``latents``: the initial noise [B, c, h, w]
        (else drawn from ``generator``, else from ``seed``); ``generator`` may be one per prompt, which makes
        each image independent of the batch it is in (class images). ``init_images`` [B, 3, H, W] in [-1, 1] +
        ``strength``: img2img (the images' latent means, noised to the level of the last
        ``int(steps * strength)`` steps). ``sizes``: SDXL's size conditions
        (``micro_conditions.sampling_batch``).
        """
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        factor = getattr(self.vae, "downsample_factor", 8)
        size = latent_size or (
            init_images.shape[-1] // factor if init_images is not None else self.latent_size()
        )
        batch = sampling_batch(self.conditioner.input_keys, prompts, (size * factor,) * 2, sizes, self.device)
        context = self.context_of(self.conditions(batch))
        uncond = self.context_of(self.conditions(negative_batch(batch, negatives, sizes), zero_empty=True))
        dtype = (context["context"] if isinstance(context, dict) else context).dtype
        init = None
        if init_images is not None:
            init = self.vae.encode(init_images.to(self.device, dtype)).mean * self.scale_factor
        shape = (len(prompts), self.unet_channels(), size, size)
        generator = generator or torch.Generator().manual_seed(seed)
        scope = self.ema_scope() if use_ema else contextlib.nullcontext(self.unet)
        with scope as unet:
            denoiser = classifier_free_guidance(unet, context, uncond, scale)
            z = (sampler or self.sampler)(
                denoiser,
                self.schedule,
                shape,
                self.parameterization,
                generator=generator,
                device=self.device,
                dtype=dtype,
                progress=progress,
                x_T=latents,
                callback=callback,
                init=init,
                strength=strength,
            )
        return self.decode_latents(z)

    def unet_channels(self) -> int:
        return getattr(self.unet, "in_channels", 4)

    def latent_size(self) -> int:
        resolution = getattr(self, "image_resolution", None) or self.data_link.facts.resolution or 32
        return resolution // getattr(self.vae, "downsample_factor", 8)

    @torch.no_grad()
    def log_images(self, batch, max_images: int = 8) -> dict[str, torch.Tensor]:
        """Fixed prompts and seed, so grids show the same prompts' progress over training."""
        if not self.scale_factor_known():
            return {}
        prompts = list(self.hparams.log_prompts)[:max_images]
        self.image_resolution = batch["image"].shape[-1]
        samples = self.generate(prompts, seed=self.hparams.log_seed, sizes=self.hparams.get("log_sizes"))
        return {"samples": samples, "inputs": batch["image"][:max_images]}
