"""One LightningModule for every fine-tuning method: load a pretrained base, freeze it, attach a method
(``ldm.models.finetune.method.FineTuneMethod``), train only what the method returns, and checkpoint exactly
the method's ``state_dict()`` (plus the scale factor and, when asked, the EMA of the method's parameters).

The base (``base``: our txt2img checkpoint, an SD single file, a diffusers folder or a hub id; default the
newest ``base_task`` run) is loaded in ``setup()`` -- or by ``prepare()`` when a checkpoint is rebuilt for
sampling. The module never changes per method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ldm.diffusion.losses import weight_on_latent_grid
from ldm.models.base_loader import load_base_model
from ldm.models.finetune.fallback import tiny_random_base
from ldm.models.finetune.method import FineTuneMethod, MethodDisabledUnsupported
from ldm.models.finetune.text_parts import SIZE_KEYS, check_family, fill_size_conditions
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.optimizer_modes import set_mode, trainer_optimizers
from ldm.models.pretrained import find_checkpoint
from ldm.models.text_offload import cache_prompts_and_offload
from ldm.modules.ema import ParameterEMA
from ldm.utils.file_identity import describe_source
from ldm.utils.hub import looks_like_hub_id
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class FineTuneModule(LatentDiffusion):
    """Args (the rest as ``LatentDiffusion``; the UNet, VAE, text encoder, schedule and parameterisation come
    from the base):
        method: the fine-tuning method (``model/method=lora|textual_inversion|hypernetwork|full``).
        base: where the base model comes from (see module docstring); ``base_tokenizer`` for SD single files
            that embed none; ``base_use_ema``: take the EMA UNet of our checkpoints.
        vae_path: a replacement VAE for the base's (a VAE file or diffusers folder of the same architecture,
            ``ldm.io.vae_file``).
        gradient_checkpointing: recompute the base UNet's blocks in backward (saves memory, costs time).
        prior_loss_weight: weight of regularisation / class items (batch key ``is_regularization``) against
            the others, ``mean(instance) + w * mean(class)`` (DreamBooth's prior preservation); None = one
            plain mean. Passed to the method's ``loss()`` hook, whatever the method.
        ema_decay: EMA of the method's parameters (None: off); sampling and validation use the average.
        ema_device: where the EMA lives ("cpu" keeps a full-UNet EMA out of GPU memory; None: with the
            weights).
        optimizer_in_backward: update each parameter inside backward and free its gradient at once.
        bf16_weights: store the UNet's weights (and the method's parameters in it) in bf16; updates are
            computed in fp32 and rounded stochastically (``ldm.models.bf16_weights``).
        offload_text_encoder: with cached latents and a frozen text encoder, encode every training caption
            (and "", the log prompts) once at the start of fit, then move the encoder to CPU
            (``ldm.models.text_offload``).
        base_family: ``"sd"`` (one text encoder: SD 1.x/2.x) or ``"sdxl"`` (two): the family a preset is
            for; a base of the other family is an error, and the fast_dev_run stand-in is of this family
            (None: any base; the stand-in is an SD-like one).
    """

    MODULE_ARGS = (*LatentDiffusion.MODULE_ARGS, "method")

    def __init__(
        self,
        method: FineTuneMethod,
        sampler: Callable,
        optimizer: Callable,
        scheduler: Callable | None = None,
        base: str | None = None,
        base_search_dir: str = "logs",
        base_task: str | None = "txt2img",
        base_use_ema: bool = True,
        base_tokenizer: str | None = None,
        gradient_checkpointing: bool = False,
        ucg_rate: float = 0.1,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        ema_decay: float | None = None,
        guidance_scale: float = 3.0,
        log_prompts: Sequence[str] = ("a red circle on a blue background",),
        log_seed: int = 0,
        optimizer_in_backward: bool = False,
        ema_device: str | None = None,
        bf16_weights: bool = False,
        offload_text_encoder: bool = False,
        prior_loss_weight: float | None = None,
        vae_path: str | None = None,
        base_family: str | None = None,
        compile: bool | str | None = None,
        compile_backend: str = "inductor",
    ):
        super().__init__(
            unet=None,
            vae=None,
            conditioner=None,
            schedule=None,
            sampler=sampler,
            optimizer=optimizer,
            scheduler=scheduler,
            ucg_rate=ucg_rate,
            min_snr_gamma=min_snr_gamma,
            offset_noise=offset_noise,
            ema_decay=ema_decay,
            vae_ckpt=None,
            guidance_scale=guidance_scale,
            log_prompts=log_prompts,
            log_seed=log_seed,
            optimizer_in_backward=optimizer_in_backward,
            bf16_weights=bf16_weights,
            compile=compile,
            compile_backend=compile_backend,
        )
        self.method = method
        self.method_ema: ParameterEMA | None = None
        self.base_source: str | None = None  # the resolved base, recorded in checkpoints
        self._vae_loaded = True  # the base brings its VAE
        self.strict_loading = False  # checkpoints hold the method's state only; on_load_checkpoint checks it

    # -- base model ------------------------------------------------------------------------------------
    @property
    def prepared(self) -> bool:
        return getattr(self, "unet", None) is not None

    def resolve_base(self, fast_dev_run: bool = False) -> str | None:
        """``base`` as a path or hub id; None only under fast_dev_run when there is none (tiny random
        base)."""
        base = self.hparams.base
        if base and (Path(base).is_dir() or (not Path(base).exists() and looks_like_hub_id(str(base)))):
            return str(base)  # a diffusers folder or a hub id: load_base_model checks it
        if not base and self.hparams.base_task is None:  # a preset for the user's own base: no run to find
            if fast_dev_run:
                return None
            raise FileNotFoundError(
                "model.base is required: give the base model to fine-tune, e.g. "
                "model.base=/models/v1-5-pruned-emaonly.safetensors (an SD .safetensors/.ckpt, a diffusers "
                "folder or a hub id; docs/real_models.md)"
            )
        found = find_checkpoint(
            base,
            self.hparams.base_search_dir,
            self.hparams.base_task,
            f"base model ({self.hparams.base_task})",
            allow_missing=fast_dev_run,
        )
        return str(found) if found else None

    def prepare(self, source: str | None, resolution: int | None = None) -> None:
        """Load the base (``source``; None: the tiny random base), freeze it, attach the method."""
        if self.prepared:
            return
        if source is None:
            log.warning("fast_dev_run without a base model: using a tiny RANDOM base (plumbing check only)")
            parts = tiny_random_base(resolution or 32, self.hparams.base_family or "sd")
        else:
            tokenizer = training_tokenizer(source, self.hparams.base_tokenizer)
            extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
            vae_path = self.hparams.get("vae_path")
            parts = load_base_model(source, use_ema=self.hparams.base_use_ema, vae_path=vae_path, **extra)
            require_tokenizer(source, parts.text_encoder)
            log.info(
                f"Base model: {source} ({parts.version}, {parts.parameterization}, "
                f"scale_factor {float(parts.scale_factor):.5f})"
            )
        conditioner = parts.conditioner()
        check_family(conditioner, self.hparams.base_family, source)
        self.set_parts(parts.unet, parts.vae, conditioner, parts.schedule)
        self.hparams.parameterization = parts.parameterization
        self.scale_factor.fill_(float(parts.scale_factor))
        self.image_resolution = getattr(self, "image_resolution", None) or resolution or parts.resolution
        for module in (self.unet, self.vae, self.conditioner):
            module.requires_grad_(False).eval()
        if self.hparams.gradient_checkpointing:
            if not hasattr(self.unet, "enable_gradient_checkpointing"):
                raise ValueError(
                    f"model.gradient_checkpointing=true: {type(self.unet).__name__} cannot checkpoint"
                )
            self.unet.enable_gradient_checkpointing(True)
            count = sum(bool(getattr(m, "use_checkpoint", False)) for m in self.unet.modules())
            log.info(f"Gradient checkpointing on {count} UNet blocks")
        self.method.attach(self)
        if not self.method.parameters():
            raise ValueError(
                f"{type(self.method).__name__} attached no trainable parameters: check its targets"
            )
        if self.hparams.ema_decay:  # built now: from the loaded base with the method attached
            self.method_ema = ParameterEMA(
                self.method.parameters(), self.hparams.ema_decay, device=self.hparams.ema_device
            )
        self.base_source = source
        self.to(self.scale_factor.device)

    def setup(self, stage: str) -> None:
        """Load the base (its resolution, without a base under fast_dev_run: the data's), then hand the data
        this model's services once its weights are there and before a checkpoint's are restored: DreamBooth's
        class images come from the base, the latent cache from its VAE (``ldm/utils/data_handover.py``)."""
        trainer = self._trainer
        fast_dev_run = bool(trainer.fast_dev_run) if trainer is not None else False
        if not self.prepared:
            self.prepare(self.resolve_base(fast_dev_run), self.data_link.facts.resolution)
        if self.data_link.prepare is not None:
            facts = self.data_link.prepare(self.data_services())
            self.data_link = replace(self.data_link, facts=facts)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.hparams.offload_text_encoder:
            return
        captions = self.data_link.facts.captions
        if captions is None:
            raise ValueError(
                "model.offload_text_encoder=true needs the training captions up front: turn on the "
                "latent cache (data.cache_latents=true) or set model.offload_text_encoder=false"
            )
        for encoder in self.conditioner.text_embedders:
            cache_prompts_and_offload(encoder, [*captions, "", *self.hparams.log_prompts])

    # -- training: what the method says ----------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.method.parameters()

    def optimizer_param_groups(self) -> list:
        return self.method.param_groups()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.prepared:  # the base stays in eval mode (no dropout); the method's own modules follow `mode`
            for module in (self.unet, self.conditioner):
                module.eval()
            for module in self.method.train_modules():
                module.train(mode)
        return self

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        if not hasattr(self, "_total_steps"):  # max_steps, else the epochs' steps (None: only max_time)
            total = self.trainer.max_steps
            total = total if total > 0 else self.trainer.estimated_stepping_batches
            self._total_steps = int(total) if math.isfinite(total) else None
        self.method.before_step(self.global_step, self._total_steps)

    def use_text_cache(self) -> bool:
        return not (self.method.trains_text_encoder and torch.is_grad_enabled())

    def loss_element_weight(self, batch, z0: torch.Tensor) -> torch.Tensor | None:
        """Masked loss: the batch's ``loss_weight`` ``[B, 1, H, W]`` (1 inside each image's mask,
        ``data.unmasked_weight`` outside; ``datamodules/masks.py``) on the latent grid (area average when
        given at image size)."""
        return weight_on_latent_grid(batch.get("loss_weight") if isinstance(batch, dict) else None, z0)

    def reduce_loss(self, per_sample_loss: torch.Tensor, batch) -> torch.Tensor:
        return self.method.loss(per_sample_loss, batch, self.hparams.prior_loss_weight)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.compile_clock is not None:
            self.compile_clock.stop()
        if self.method_ema is not None:
            self.method_ema.update(self.method.parameters())

    @contextlib.contextmanager
    def ema_scope(self):
        """The EMA of the method's parameters in place of the live ones (validation, sampling, export)."""
        if self.method_ema is None:
            yield self.unet
            return
        params = self.method.parameters()
        self.method_ema.swap(params)
        try:
            yield self.unet
        finally:
            self.method_ema.swap(params)

    def batch_latents_and_context(self, batch, train: bool):
        if "latent_mean" in batch:
            mean = batch["latent_mean"]
            noise = self.batch_random.randn(mean.shape, mean.device, mean.dtype)
            batch = {**batch, "latent": batch["latent_mean"] + batch["latent_std"] * noise}
        if any(key in SIZE_KEYS for key in self.conditioner.input_keys):  # SDXL: sizes (data without them)
            batch = fill_size_conditions(batch, self.conditioner.input_keys, self._image_size(batch))
        return super().batch_latents_and_context(batch, train)

    def _image_size(self, batch) -> tuple[int, int]:
        """(h, w) of the batch's images (from the latents: x the VAE's downsampling)."""
        if "image" in batch:
            return tuple(batch["image"].shape[-2:])
        return tuple(int(side) * self.vae.downsample_factor for side in batch["latent"].shape[-2:])

    def export(self, path: str | Path) -> Path:
        """The method's exchange file (EMA weights when kept), with run metadata."""
        base = describe_source(self.base_source)  # file name + SHA-256: shared files never hold a local path
        metadata = {
            "base": base.get("name", ""),
            "base_sha256": base.get("sha256", ""),
            "steps": self.global_step,
            "resolution": getattr(self, "image_resolution", None) or "",
        }
        set_mode(trainer_optimizers(self), False)  # schedule-free: export x (the next step goes back to y)
        with self.ema_scope():
            return self.method.export(path, metadata)

    # -- checkpoints hold the method's state only ------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        if self.method_ema is not None:
            state.update({f"method_ema.{k}": v for k, v in self.method_ema.state_dict().items()})
        state["scale_factor"] = self.scale_factor.detach().clone()
        checkpoint["state_dict"] = state
        checkpoint["base"] = self.base_source

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if not self.prepared:
            self.prepare(checkpoint.get("base"))
        self.load_method_checkpoint(checkpoint["state_dict"])
        checkpoint[
            "state_dict"
        ] = {}  # everything is loaded; Lightning's own (non-strict) load has nothing left

    def load_method_checkpoint(self, state: dict) -> None:
        method_state = {k[len("method.") :]: v for k, v in state.items() if k.startswith("method.")}
        if not method_state:
            raise ValueError(
                "this checkpoint holds no fine-tuning method state (keys 'method.*'): it was not "
                "written by a fine-tune, or by an older version; train again or pass it as model.base"
            )
        self.method.load_state_dict(method_state)
        ema_state = {k[len("method_ema.") :]: v for k, v in state.items() if k.startswith("method_ema.")}
        if self.method_ema is not None and ema_state:
            self.method_ema.load_state_dict(ema_state)
        elif self.method_ema is not None:
            log.warning("the checkpoint has no EMA of the method's parameters; the EMA restarts from them")
            self.method_ema = ParameterEMA(
                self.method.parameters(), self.hparams.ema_decay, device=self.hparams.ema_device
            )
        if "scale_factor" in state:
            self.scale_factor.copy_(state["scale_factor"])

    # -- images: with and without the method -----------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch, max_images: int = 8) -> dict[str, torch.Tensor]:
        prompts = list(self.hparams.log_prompts)[:max_images]
        if "image" in batch:
            self.image_resolution = batch["image"].shape[-1]
        elif self.data_link.facts.resolution:
            self.image_resolution = self.data_link.facts.resolution
        images = {"samples": self.generate(prompts, seed=self.hparams.log_seed)}
        try:
            with self.method.disabled():
                images["base_samples"] = self.generate(prompts, seed=self.hparams.log_seed)
        except MethodDisabledUnsupported:
            pass  # e.g. a full UNet fine-tune: the base is gone, only the result is shown
        return images


def training_tokenizer(source: str, given: str | None):
    """``model.base_tokenizer`` when set; else, for a ``.safetensors`` single file that embeds none, CLIP's
    tokenizer found before any weights load (``ValueError`` naming the fix when there is none)."""
    from ldm.io.sd_tokenizer import single_file_tokenizer

    if given or not (str(source).endswith(".safetensors") and Path(source).is_file()):
        return given
    try:
        return single_file_tokenizer(source)
    except LookupError as err:
        raise ValueError(str(err)) from None


def require_tokenizer(source: str, text_encoder) -> None:
    """Training encodes captions: a base whose text encoder has no tokenizer stops here, naming the fix."""
    from ldm.io.clip_bpe import OPEN_CLIP_INSTALL_HINT
    from ldm.io.sd_tokenizer import TOKENIZER_HINT

    if hasattr(text_encoder, "tokenizer") and text_encoder.tokenizer is None:
        raise ValueError(
            f"base model {source}: its text encoder has no tokenizer, so captions cannot be encoded. "
            f"{TOKENIZER_HINT}, or {OPEN_CLIP_INSTALL_HINT}"
        )
