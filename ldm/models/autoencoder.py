"""The VAE (first stage) as a LightningModule: reconstruction + KL, optional LPIPS and PatchGAN.

Manual optimisation (two optimisers once the discriminator is on). Note that Lightning counts every
optimiser step in ``global_step``: with the GAN active, ``global_step`` and ``max_steps`` advance by two
per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.models.compile_clock import compile_network
from ldm.models.guards import check_finite
from ldm.models.resume_lr import apply_configured_lrs, configured_lrs
from ldm.modules.autoencoder_loss import adaptive_gan_weight, hinge_d_loss, kl_loss, reconstruction_loss
from ldm.modules.compile import compile_mode
from ldm.modules.vae import AutoencoderKL


class AutoencoderModule(L.LightningModule):
    uses_captions = False  # images only: its data skips caption files (``connect_data``)

    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        kld_weight: float = 1e-6,
        rec_loss: str = "l1",
        lpips: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        discriminator: nn.Module | None = None,
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        disc_start: int = 0,
        disc_weight: float = 0.5,
        grad_clip: float | None = 1.0,
        compile: bool | str | None = None,
        compile_backend: str = "inductor",
    ):
        """``compile``: false | true/whole | blocks, torch.compile of the VAE for training
        (``ldm/modules/compile.py``)."""
        super().__init__()
        self.save_hyperparameters(
            ignore=["vae", "lpips", "discriminator", "optimizer", "disc_optimizer", "scheduler"], logger=False
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.disc_optimizer_factory = disc_optimizer
        if perceptual_weight > 0 and lpips is None:
            raise ValueError(
                "model.perceptual_weight > 0 needs model.lpips (local LPIPS weight files); "
                "set model.perceptual_weight=0 or configure model.lpips."
            )
        if discriminator is not None and disc_optimizer is None:
            raise ValueError("model.discriminator is set but model.disc_optimizer is not")
        self.automatic_optimization = False
        compile_mode(compile)  # model.compile=fast fails here, not at the first step
        self.compile_clock = None
        self.vae = vae
        self.lpips = lpips
        self.discriminator = discriminator
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def configure_model(self) -> None:
        mode, backend = compile_mode(self.hparams.compile), self.hparams.compile_backend
        self.compile_clock = compile_network(self, self.vae, "the VAE", mode, backend)

    def on_train_batch_start(self, batch, batch_idx):
        if self.compile_clock is not None:
            self.compile_clock.start()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.compile_clock is not None:
            self.compile_clock.stop()

    # -- API used by the latent diffusion model and the tests ------------------------------------------
    def encode(self, x: torch.Tensor):
        return self.vae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)

    # -- losses -----------------------------------------------------------------------------------------
    def _generator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, posterior
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rec = reconstruction_loss(x, x_rec, self.hparams.rec_loss)  # [B], summed over pixels
        if self.lpips is not None and self.hparams.perceptual_weight > 0:
            rec = rec + self.hparams.perceptual_weight * self.lpips(x, x_rec) * x[0].numel()
        nll = rec.mean()
        kl = kl_loss(posterior)
        loss = nll + self.hparams.kld_weight * kl
        logs = {"rec_loss": nll.detach() / x[0].numel(), "kl": kl.detach()}
        return loss, nll, logs

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.disc_start

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        opts = self.optimizers()
        opt_ae, opt_d = (opts, None) if not isinstance(opts, list) else opts
        x_rec, posterior = self.vae(x)
        loss, nll, logs = self._generator_loss(x, x_rec, posterior)
        if self._gan_active():
            g_loss = -self.discriminator(x_rec).mean()
            d_weight = (
                adaptive_gan_weight(nll, g_loss, self.vae.last_layer_weight()) * self.hparams.disc_weight
            )
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        check_finite(loss, self, logs)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(
                opt_ae, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
            )
        opt_ae.step()
        if self.scheduler_factory is not None:  # manual optimisation: the schedule is stepped here
            schedulers = self.lr_schedulers()
            (schedulers[0] if isinstance(schedulers, list) else schedulers).step()

        if self._gan_active():
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_rec.detach()))
            check_finite(d_loss, self, {"d_loss": d_loss.detach()})
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            logs["d_loss"] = d_loss.detach()
        n = x.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=n)
        return loss.detach()

    def validation_step(self, batch, batch_idx):
        x = batch["image"]
        posterior = self.vae.encode(x)
        x_rec = self.vae.decode(posterior.mode())
        loss, _, logs = self._generator_loss(x, x_rec, posterior)
        self.val_psnr((x_rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
        self.val_ssim((x_rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
        n = x.shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=n)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=n)
        self.log("val/ssim", self.val_ssim, batch_size=n)

    def configure_optimizers(self):
        optimizers = [self.optimizer_factory(params=self.vae.parameters())]
        if self.discriminator is not None:
            optimizers.append(self.disc_optimizer_factory(params=self.discriminator.parameters()))
        if self.scheduler_factory is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        return optimizers, [
            {"scheduler": self.scheduler_factory(optimizer=optimizers[0]), "interval": "step"}
        ]

    def on_fit_start(self) -> None:
        # before a checkpoint's optimiser state replaces them
        self._configured_lrs = configured_lrs(self.trainer)

    def on_train_start(self) -> None:
        # an lr given at resume applies
        apply_configured_lrs(self.trainer, getattr(self, "_configured_lrs", None))

    @torch.no_grad()
    def log_images(self, batch, max_images: int = 8) -> dict[str, torch.Tensor]:
        """Inputs, reconstructions (posterior mean) and decoded samples from the prior N(0, I)."""
        x = batch["image"][:max_images].to(self.device)
        posterior = self.vae.encode(x)
        z = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0)).to(x)
        return {
            "inputs": x,
            "reconstructions": self.vae.decode(posterior.mode()).clamp(-1, 1),
            "prior_samples": self.vae.decode(z).clamp(-1, 1),
        }
