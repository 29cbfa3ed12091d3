"""Text-to-image latent diffusion as a LightningModule (thin: the math is in ``ldm/diffusion``).

z0 = scale_factor * VAE posterior sample; z_t = q_sample(z0, t, eps); the UNet predicts eps, v or x0 given
the conditions of the batch (``ldm.modules.conditioner.Conditioner``: the caption's CLIP context);
loss = ``diffusion_loss`` (``ldm.diffusion.losses.DiffusionLoss``: the parameterisation's MSE, plain or
Min-SNR weighted, from ``model.parameterization`` / ``model.min_snr_gamma``, or ``model/loss=...``). Sampling:
any ``ldm.diffusion`` sampler with classifier-free guidance over the EMA UNet, then the VAE decoder.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import nn

from ldm.diffusion import (
    DiffusionLoss,
    DiffusionSchedule,
    Parameterization,
    build_loss,
    call_model,
    sample_noise,
)
from ldm.models.bf16_weights import StochasticRoundingOptimizer, use_bf16_weights
from ldm.models.compile_clock import compile_network
from ldm.models.guards import check_finite
from ldm.models.latent_diffusion_sampling import LatentDiffusionSampling
from ldm.models.micro_conditions import unet_condition
from ldm.models.optimizer_modes import save_in_eval_mode, set_mode, trainer_optimizers
from ldm.models.optimizers import OptimizerInBackward
from ldm.models.pretrained import find_checkpoint, load_prefixed_state
from ldm.models.resume_lr import apply_configured_lrs, configured_lrs
from ldm.modules.compile import compile_mode
from ldm.modules.conditioner import Conditioner, as_conditioner
from ldm.modules.ema import EMA
from ldm.utils.batch_random import BatchRandom
from ldm.utils.data_handover import DataFacts, DataLink, DataServices
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class LatentDiffusion(LatentDiffusionSampling, L.LightningModule):
    # constructor arguments that are modules or factories, kept out of ``hparams``
    MODULE_ARGS = (
        "unet",
        "vae",
        "conditioner",
        "text_encoder",
        "schedule",
        "sampler",
        "optimizer",
        "scheduler",
    )

    def __init__(
        self,
        unet: nn.Module | None,
        vae: nn.Module | None,
        conditioner: Conditioner | nn.Module | None = None,
        schedule: DiffusionSchedule | None = None,
        *,
        sampler: Callable,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        parameterization: str = "eps",
        scale_factor: float | None = None,
        ucg_rate: float = 0.1,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        ema_decay: float | None = 0.999,
        vae_ckpt: str | None = None,
        vae_search_dir: str = "logs",
        vae_task: str = "vae",
        guidance_scale: float = 3.0,
        log_prompts: Sequence[str] = ("a red circle on a blue background",),
        log_seed: int = 0,
        log_sizes: dict | None = None,
        optimizer_in_backward: bool = False,
        bf16_weights: bool = False,
        text_encoder: nn.Module | None = None,
        compile: bool | str | None = None,
        compile_backend: str = "inductor",
    ):
        """``conditioner``: the embedders of the batch's conditions (a bare text encoder is wrapped as the one
        embedder). ``text_encoder``: the same, as older checkpoints' ``model_config`` spell it (give one of
        the two). ``ucg_rate``: the condition dropout of every embedder that sets none of its own.
        ``log_sizes``: SDXL's size conditions of logged grids (``original_size`` / ``crop_top_left`` /
        ``target_size``; null: defaults). ``compile``: false | true/whole | blocks, torch.compile of the
        UNet for training (``ldm/modules/compile.py``)."""
        super().__init__()
        if text_encoder is not None:
            if conditioner is not None:
                raise ValueError("give the model a conditioner or a text_encoder, not both")
            conditioner = text_encoder
        self.save_hyperparameters(ignore=list(self.MODULE_ARGS), logger=False)
        build_loss(parameterization, min_snr_gamma)  # a bad name or gamma fails here, not at the first step
        compile_mode(compile)  # model.compile=fast fails here too
        self.compile_clock = None
        self.sampler = sampler
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.unet_ema = None
        if unet is not None:  # a fine-tune attaches its parts later, from the base model (set_parts)
            self.set_parts(unet, vae, conditioner, schedule)
            self.unet_ema = EMA(unet, ema_decay) if ema_decay else None
        # <= 0 means "estimate from the first training batch" (LDM's scale_by_std); saved in checkpoints
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor) if scale_factor else -1.0))
        self._scale_factor_known = False  # caches "scale_factor > 0" so steps need no device sync
        self.model_config: dict | None = None  # set by train.py; stored in checkpoints for sample.py
        self.data_link = DataLink(
            DataFacts()
        )  # what the data tells the model (connect_data): never the datamodule
        self._register_load_state_dict_pre_hook(_rename_text_encoder_keys)

    def set_parts(
        self,
        unet: nn.Module,
        vae: nn.Module,
        conditioner: Conditioner | nn.Module,
        schedule: DiffusionSchedule,
    ) -> None:
        conditioner = as_conditioner(conditioner)
        context_dim, hidden = getattr(unet, "context_dim", None), conditioner.context_dim
        if context_dim is not None and hidden is not None and context_dim != hidden:
            raise ValueError(
                f"the UNet's context_dim ({context_dim}) must equal the text encoder's hidden size "
                f"({hidden}); set model.unet.context_dim={hidden}"
            )
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.conditioner = conditioner
        self.schedule = schedule

    @property
    def text_encoder(self) -> nn.Module:
        """The conditioner's one text embedder (SD 1.x / 2.x): what fine-tuning methods and files act on."""
        return self.conditioner.text_encoder

    # -- the data: facts in, services out (ldm/utils/data_handover.py) --------------------------------------
    def link_data(self, link: DataLink) -> None:
        """The datamodule's facts (resolution, ...) and its preparation step, from ``connect_data``."""
        self.data_link = link

    def data_services(self) -> DataServices:
        """What this model offers the data: the VAE encoder, a class-image generator, their fingerprints."""
        from ldm.models.data_services import data_services

        return data_services(self)

    # -- pretrained parts ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or getattr(self, "_vae_loaded", False):
            return
        fast_dev_run = bool(self.trainer.fast_dev_run) if self._trainer is not None else False
        path = find_checkpoint(
            self.hparams.vae_ckpt,
            self.hparams.vae_search_dir,
            self.hparams.vae_task,
            "VAE",
            allow_missing=fast_dev_run,
        )
        if path is not None:
            load_prefixed_state(self.vae, path, "vae", "VAE")
        self._vae_loaded = True

    def configure_model(self) -> None:
        """``bf16_weights``: the UNet's weights stored in bf16 (the optimiser rounds updates
        stochastically)."""
        if self.hparams.get("bf16_weights", False) and getattr(self, "unet", None) is not None:
            use_bf16_weights(self.unet)
        if getattr(self, "unet", None) is not None:
            mode, backend = compile_mode(self.hparams.get("compile")), self.hparams.get("compile_backend")
            self.compile_clock = compile_network(self, self.unet, "the UNet", mode, backend or "inductor")

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "vae", None) is not None:
            self.vae.eval()
        set_mode(trainer_optimizers(self), mode)  # schedule-free: evaluate and keep x, step at y
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates; fine-tuning methods override this."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def optimizer_param_groups(self) -> list:
        """The optimiser's parameters (or parameter groups with their own options)."""
        return self.trainable_parameters()

    # -- encoding --------------------------------------------------------------------------------------
    @property
    def batch_random(self) -> BatchRandom:
        """The training batch's random draws (``BatchRandom``): seeded by the run seed and the batch counter,
        rank-strided, so DDP with per-rank batch B equals one process with batch B x world size, and a resumed
        run draws what the uninterrupted one drew. Outside training: the global RNG."""
        return getattr(self, "_batch_random", None) or BatchRandom()

    def on_train_batch_start(self, batch, batch_idx):
        set_mode(trainer_optimizers(self), True)
        if self.compile_clock is not None:
            self.compile_clock.start()
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))  # set by seed_everything, inherited by DDP ranks
        index = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self._batch_random = BatchRandom.for_batch(
            seed, index, self.trainer.global_rank, self.trainer.world_size
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> scaled latents z0 [B, c, H/f, W/f] (a posterior sample)."""
        return self.sample_posterior(images) * self.scale_factor

    def vae_encode(self, images: torch.Tensor):
        """The VAE posterior of ``images``, computed at the VAE weights' own precision even under autocast
        (``trainer.precision=bf16-mixed`` runs the UNet in bf16, never the VAE)."""
        dtype = next(self.vae.parameters()).dtype
        with torch.autocast(images.device.type, enabled=False):
            return self.vae.encode(images.to(dtype))

    @torch.no_grad()
    def sample_posterior(self, images: torch.Tensor) -> torch.Tensor:
        """An unscaled sample of the VAE posterior q(z|x), drawn rank-consistently (``batch_random``)."""
        posterior = self.vae_encode(images)
        eps = self.batch_random.randn(posterior.mean.shape, posterior.mean.device, posterior.mean.dtype)
        return posterior.mean + posterior.std * eps

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        with torch.autocast(z.device.type, enabled=False):  # at the VAE's precision, as vae_encode
            return self.vae.decode((z / self.scale_factor).to(dtype)).clamp(-1, 1)

    def conditions(self, batch, train: bool = False, zero_empty: bool = False) -> dict[str, torch.Tensor]:
        """The conditioner's output for ``batch`` (``{"crossattn": ..., "vector": ...}``), on the model's
        device (also when a text encoder was offloaded); ``train``: with each embedder's condition dropout
        (its ``ucg_rate``, else ``model.ucg_rate``: a dropped caption becomes "", drawn from
        ``batch_random``); ``zero_empty``: an unconditional branch (SDXL zeroes "" text,
        ``force_zeros_for_empty_prompt``)."""
        draw = self.batch_random.rand if train else None
        return self.conditioner(
            batch,
            device=self.device,
            ucg_rate=self.hparams.ucg_rate,
            draw=draw,
            use_cache=self.use_text_cache(),
            zero_empty=zero_empty,
        )

    def use_text_cache(self) -> bool:
        """Whether text is encoded through the embedders' prompt caches (fine-tunes that train text: not)."""
        return True

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> the cross-attention context [B, T, D]."""
        return self.context_of(self.conditions({"caption": list(prompts)}))

    @staticmethod
    def context_of(conditions: dict[str, torch.Tensor]):
        """The UNet's condition: the context [B, T, D], or ``{"context", "y"}`` when there is a vector
        (SDXL)."""
        return unet_condition(conditions)

    def scale_factor_known(self) -> bool:
        """True once the buffer holds a factor (given, estimated, or loaded); read from the device until
        then."""
        if not self._scale_factor_known:
            self._scale_factor_known = float(self.scale_factor) > 0
        return self._scale_factor_known

    @torch.no_grad()
    def _estimate_scale_factor(self, images: torch.Tensor) -> None:
        z = self.sample_posterior(images).flatten().double()
        moments = torch.stack([z.new_tensor(z.numel()), z.sum(), z.square().sum()])
        if self.trainer.world_size > 1:  # the std of every rank's latents together, as one process would see
            moments = self.all_gather(moments).reshape(-1, 3).sum(0)
        count, total, squares = moments.tolist()
        value = 1.0 / ((squares - total * total / count) / (count - 1)) ** 0.5
        self.scale_factor.fill_(float(value))
        log.info(f"scale_factor estimated from the first batch: {float(value):.5f} (1 / std of latents)")

    # -- training --------------------------------------------------------------------------------------
    def diffusion_step(
        self,
        z0: torch.Tensor,
        context: torch.Tensor,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        element_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss for clean latents z0 and text context (one random timestep per sample): a scalar, or the
        per-sample losses ``[B]`` with ``reduction="none"``; ``element_weight``: per latent element."""
        b = z0.shape[0]
        if generator is None:  # training: rank-consistent draws (see BatchRandom)
            t = self.batch_random.randint(self.schedule.num_timesteps, (b,), z0.device)
            noise = sample_noise(
                z0,
                self.hparams.offset_noise,
                draw=lambda shape: self.batch_random.randn(shape, z0.device, z0.dtype),
            )
        else:
            t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=generator).to(z0.device)
            noise = sample_noise(z0, self.hparams.offset_noise, generator)
        zt = self.schedule.q_sample(z0, t, noise)
        output = call_model(self.unet, zt, t, context)
        return self.diffusion_loss(output, z0, noise, t, self.schedule, reduction, element_weight)

    @property
    def diffusion_loss(self) -> DiffusionLoss:
        """The loss the hparams name (rebuilt on each use: a fine-tune learns its parameterisation from its
        base after construction)."""
        return build_loss(self.hparams.parameterization, self.hparams.min_snr_gamma)

    @property
    def parameterization(self) -> Parameterization:
        """What the UNet predicts (``ldm.diffusion.parameterization``), from ``hparams.parameterization``."""
        return self.diffusion_loss.parameterization

    def batch_latents_and_context(self, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context_of(self.conditions(batch, train))  # its dropout draws come first
        z0 = batch["latent"] * self.scale_factor if "latent" in batch else self.encode_images(batch["image"])
        return z0, context

    def training_step(self, batch, batch_idx):
        if not self.scale_factor_known():
            self._estimate_scale_factor(batch["image"])
        z0, context = self.batch_latents_and_context(batch, train=True)
        weight = self.loss_element_weight(batch, z0)
        loss = self.reduce_loss(
            self.diffusion_step(z0, context, reduction="none", element_weight=weight), batch
        )
        check_finite(loss, self, {"loss": loss.detach()})
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def loss_element_weight(self, batch, z0: torch.Tensor) -> torch.Tensor | None:
        """Per latent element weights of the loss (None: uniform); fine-tunes read masks from the batch."""
        return None

    def reduce_loss(self, per_sample_loss: torch.Tensor, batch) -> torch.Tensor:
        """Per-sample losses ``[B]`` -> the training loss (fine-tuning methods weight class items)."""
        return per_sample_loss.mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.compile_clock is not None:
            self.compile_clock.stop()
        if self.unet_ema is not None:
            self.unet_ema.update(self.unet)

    def validation_step(self, batch, batch_idx):
        if not self.scale_factor_known():
            return
        z0, context = self.batch_latents_and_context(batch, train=False)
        generator = torch.Generator().manual_seed(batch_idx)  # same t and noise every validation
        with self.ema_scope():
            loss = self.diffusion_step(z0, context, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=z0.shape[0])

    def configure_optimizers(self):
        optimizer = self.build_optimizer(self.optimizer_param_groups())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "step"},
        }

    def on_fit_start(self) -> None:
        self._configured_lrs = configured_lrs(
            self.trainer
        )  # before a checkpoint's optimiser state replaces them

    def on_train_start(self) -> None:
        apply_configured_lrs(
            self.trainer, getattr(self, "_configured_lrs", None)
        )  # an lr given at resume applies

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        """``optimizer`` over ``params`` (a list or parameter groups); with ``optimizer_in_backward`` each
        parameter steps inside backward and its gradient is freed at once (``OptimizerInBackward``)."""
        factory = self.optimizer_factory
        if self.hparams.get("bf16_weights", False):
            seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))  # the same rounding on every rank
            factory = functools.partial(
                StochasticRoundingOptimizer, factory=self.optimizer_factory, seed=seed
            )
        if not self.hparams.optimizer_in_backward:
            return factory(params=params)
        trainer = self._trainer
        if trainer is not None and (trainer.gradient_clip_val or trainer.accumulate_grad_batches > 1):
            raise ValueError(
                "model.optimizer_in_backward=true cannot be combined with trainer.gradient_clip_val "
                "or trainer.accumulate_grad_batches > 1 (gradients are freed as they arrive)"
            )
        return OptimizerInBackward(params, factory)

    def on_train_end(self) -> None:
        set_mode(trainer_optimizers(self), False)  # the weights left in memory (export, sampling) are x

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_in_eval_mode(self, checkpoint)
        if self.model_config is not None:
            checkpoint["model_config"] = self.model_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._vae_loaded = True  # the checkpoint carries the VAE weights


def _rename_text_encoder_keys(state_dict, prefix, *args) -> None:
    """Older checkpoints: ``text_encoder.*`` (the model's one text encoder) is
    ``conditioner.embedders.0.*``."""
    old, new = f"{prefix}text_encoder.", f"{prefix}conditioner.embedders.0."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old) :]] = state_dict.pop(key)
