"""The fine-tuning base: load a pretrained latent diffusion model, freeze it, let a method add and train
its own parameters, and save only those (a small file) in checkpoints and exports.

A method subclasses :class:`FineTuneModule` and implements ``add_adapters()``, ``adapter_parameters()``,
``adapter_disabled()`` (a context in which the base model runs unchanged, for before/after grids) and
``export_adapter(path)``; it may add losses by overriding ``training_step``.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from torch import nn

from ldm.io.base_model import load_base_model
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.pretrained import find_checkpoint
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class FineTuneModule(LatentDiffusion):
    """``unet``/``vae``/``text_encoder`` given by config are random stand-ins, used only when no base is found
    under ``trainer.fast_dev_run``; otherwise ``base`` (or the newest ``base_task`` run) replaces them."""

    def __init__(self, *args, base: str | None = None, base_search_dir: str = "logs", base_task: str = "txt2img",
                 base_use_ema: bool = True, base_tokenizer: str | None = None, **kwargs):
        kwargs.setdefault("ema_decay", None)
        kwargs["vae_ckpt"] = None  # the base model brings its VAE
        super().__init__(*args, **kwargs)
        self._adapters_added = False

    # -- base model ------------------------------------------------------------------------------------
    def _resolve_base(self, fast_dev_run: bool) -> str | None:
        base = self.hparams.base
        if base and not Path(base).exists() and not str(base).endswith((".ckpt", ".safetensors")):
            return base  # a hub id: the loader says what to do offline
        found = find_checkpoint(base, self.hparams.base_search_dir, self.hparams.base_task,
                                f"base model ({self.hparams.base_task})", allow_missing=fast_dev_run)
        return str(found) if found else None

    def load_base(self, source: str) -> None:
        """Our txt2img checkpoint, an SD single file, a diffusers folder or a hub id (``load_base_model``)."""
        extra = {"tokenizer": self.hparams.base_tokenizer} if self.hparams.base_tokenizer else {}
        parts = load_base_model(source, use_ema=self.hparams.base_use_ema, **extra)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae.eval(), parts.text_encoder
        self.schedule = parts.schedule
        self.hparams.parameterization = parts.parameterization
        self.scale_factor.fill_(float(parts.scale_factor))
        self.image_resolution = getattr(self, "image_resolution", None) or parts.resolution
        log.info(f"Base model: {source} ({parts.version}, {parts.parameterization}, "
                 f"scale_factor {float(parts.scale_factor):.5f})")

    def setup(self, stage: str) -> None:
        if self._adapters_added:
            return
        fast_dev_run = bool(self.trainer.fast_dev_run) if self._trainer is not None else False
        source = self._resolve_base(fast_dev_run)
        if source is not None:
            self.load_base(source)
        elif not self.scale_factor_known():
            self.scale_factor.fill_(1.0)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.add_adapters()
        self._adapters_added = True
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks it
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "cache_latents"):
            datamodule.cache_latents(self._encode_moments, self._vae_fingerprint(), device=self.device)

    @torch.no_grad()
    def _encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images.to(self.device))
        return posterior.mean, posterior.std

    def _vae_fingerprint(self) -> str:
        digest = hashlib.sha1()
        for name, tensor in sorted(self.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().flatten()[:64].numpy().tobytes())
        return digest.hexdigest()[:16]

    # -- what a method provides ------------------------------------------------------------------------
    def add_adapters(self) -> None:
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def adapter_disabled(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def export_adapter(self, path: str | Path) -> Path:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = self.adapter_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: check the method's targets")
        return params

    # -- checkpoints hold the adapter only -------------------------------------------------------------
    def adapter_state_keys(self) -> set[str]:
        ids = {id(p) for p in self.adapter_parameters()}
        keys = {name for name, p in self.named_parameters() if id(p) in ids}
        return keys | {name for name, _ in self.named_buffers() if self.is_adapter_buffer(name)}

    def is_adapter_buffer(self, name: str) -> bool:
        return name == "scale_factor"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        keep = self.adapter_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["base"] = self.hparams.base

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        missing = sorted(self.adapter_state_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"this checkpoint lacks adapter weights {missing[:5]}: it was written by another "
                             "method or configuration (rank, targets). Resume with the same model config.")

    # -- images: with and without the adapter ----------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch, max_images: int = 8) -> dict[str, torch.Tensor]:
        prompts = list(self.hparams.log_prompts)[:max_images]
        if "image" in batch:
            self.image_resolution = batch["image"].shape[-1]
        elif self._trainer is not None and getattr(self.trainer.datamodule, "resolution", None):
            self.image_resolution = self.trainer.datamodule.resolution
        images = {"samples": self.generate(prompts, seed=self.hparams.log_seed)}
        with self.adapter_disabled():
            images["base_samples"] = self.generate(prompts, seed=self.hparams.log_seed)
        return images

    def batch_latents_and_context(self, batch, train: bool):
        if "latent_mean" in batch:
            noise = torch.randn_like(batch["latent_mean"])
            batch = {**batch, "latent": batch["latent_mean"] + batch["latent_std"] * noise}
        return super().batch_latents_and_context(batch, train)
