"""CLIP-T, CLIP-I and DINO of the model's samples at every validation, logged as ``val/clip_t``,
``val/clip_i``, ``val/dino`` to every configured logger (csv, TensorBoard, wandb: curves over steps), so a
checkpoint can be chosen by one of them (``callbacks.model_checkpoint.monitor=val/dino mode=max``).

    python train.py experiment=dreambooth +callbacks=subject_metrics \\
        callbacks.subject_metrics.clip=/models/clip-vit-base-patch32 \\
        callbacks.subject_metrics.dino=/models/dino-vits16

At each validation the model samples ``prompts`` (default: its ``log_prompts``), ``images_per_prompt`` each,
with fixed seeds (the same noise every time, so the curves show the model, not the draw), with ``sampler`` in
``steps`` steps. The cost is prompts x images_per_prompt x steps UNet calls (x2 with classifier-free
guidance) per validation; it is logged when fit starts. CLIP-T pairs every sample with its prompt; CLIP-I and
DINO pair the samples of the prompts that contain ``subject_match`` (all when None) with the first
``reference_images`` training images that are not regularisation / class images (the subject). The grid of
the samples is saved as ``images/metrics_step<N>.png``. Every rank samples the same images (the mean over
ranks that is logged is that value).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from PIL import Image

from ldm.diffusion import build_sampler
from ldm.modules.subject_metrics import SubjectMetrics
from ldm.utils.images import make_grid, save_image
from ldm.utils.logging import get_logger

log = get_logger(__name__)
KEY = "callbacks.subject_metrics"


def reference_images(datamodule, limit: int) -> torch.Tensor | None:
    """The first ``limit`` training images that are not regularisation items, [N, 3, H, W] in [-1, 1]."""
    dataset = getattr(datamodule, "data_train", None)
    if dataset is None or limit <= 0:
        return None
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        if "image" in item and not bool(item.get("is_regularization", False)):
            images.append(torch.as_tensor(item["image"]))
        if len(images) == limit:
            break
    return torch.stack(images) if images else None


class SubjectMetricsLogger(L.Callback):
    def __init__(
        self,
        clip: str | None = None,
        dino: str | None = None,
        prompts: list[str] | None = None,
        subject_match: str | None = None,
        images_per_prompt: int = 1,
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        guidance: float | None = None,
        seed: int = 0,
        reference_images: int = 8,
    ):
        if not clip and not dino:
            raise ValueError(f"{KEY}: set {KEY}.clip and/or {KEY}.dino to a local model folder")
        self.metrics = SubjectMetrics.from_paths(clip, dino, flags=(f"{KEY}.clip", f"{KEY}.dino"))
        self.prompts = list(prompts) if prompts else None
        self.subject_match = subject_match
        self.images_per_prompt = images_per_prompt
        self.sampler = build_sampler(sampler, steps=steps)
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.reference_limit = reference_images
        self.references: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    def _prompts(self, pl_module) -> list[str]:
        return self.prompts or list(pl_module.hparams.log_prompts)

    def on_fit_start(self, trainer, pl_module):
        self.metrics.to(pl_module.device)
        self.references = reference_images(trainer.datamodule, self.reference_limit)
        n = len(self._prompts(pl_module)) * self.images_per_prompt
        log.info(
            f"subject metrics ({', '.join(self.metrics.names)}) at every validation: {n} samples "
            f"({len(self._prompts(pl_module))} prompts x {self.images_per_prompt}) x {self.steps} steps, "
            f"against {0 if self.references is None else len(self.references)} reference image(s)"
        )

    @torch.no_grad()
    def sample(self, pl_module) -> tuple[torch.Tensor, list[str]]:
        """Every prompt ``images_per_prompt`` times, image i from the noise of seed ``seed + i``."""
        prompts = [p for p in self._prompts(pl_module) for _ in range(self.images_per_prompt)]
        size = pl_module.latent_size()
        shape = (pl_module.unet_channels(), size, size)
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + i))
            for i in range(len(prompts))
        ]
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.generate(
                prompts, guidance_scale=self.guidance, sampler=self.sampler, latents=torch.stack(noise)
            )
        finally:
            pl_module.train(was_training)
        return images, prompts

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        subject = [i for i, p in enumerate(prompts) if self.subject_match is None or self.subject_match in p]
        values = {}
        if self.metrics.clip_model is not None:
            values["clip_t"] = self.metrics.clip_t(images, prompts)
        if self.references is not None and subject:
            references = self.references.to(images.device, images.dtype)
            if self.metrics.clip_model is not None:
                values["clip_i"] = self.metrics.clip_i(images[subject], references)
            if self.metrics.dino_model is not None:
                values["dino"] = self.metrics.dino(images[subject], references)
        return values

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        images, prompts = self.sample(pl_module)
        values = self.compute(images, prompts)
        for name, value in values.items():
            pl_module.log(f"val/{name}", value, on_step=False, on_epoch=True, sync_dist=True)
        self.history.append({"step": trainer.global_step, **values})
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / "images"
            save_image(
                Image.fromarray(make_grid(images)), folder / f"metrics_step{trainer.global_step:06d}.png"
            )
        log.info("step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
