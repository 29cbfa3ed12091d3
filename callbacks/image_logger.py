"""Log the model's ``log_images()`` as grids: PNG files in the run directory, wandb and TensorBoard.

The model says what to show (a dict of name -> [B, 3, H, W] tensors in [-1, 1]); this callback decides
when (first step, every ``every_n_steps``, end of fit) and where. Rank zero only.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from ldm.utils.images import make_grid, save_image
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class ImageLogger(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 500,
        max_images: int = 8,
        log_first_step: bool = True,
        log_on_fit_end: bool = True,
        save_dir: str | None = None,
    ):
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.log_first_step = log_first_step
        self.log_on_fit_end = log_on_fit_end
        self.save_dir = save_dir
        self._last_batch = None
        self._logged_step = -1
        self.saved: list[Path] = []

    def _image_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.save_dir or trainer.default_root_dir) / "images"

    @rank_zero_only
    def log_now(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, tag: str) -> dict:
        if not hasattr(pl_module, "log_images"):
            return {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.log_images(batch, max_images=self.max_images)
        finally:
            pl_module.train(was_training)
        step = trainer.global_step
        for name, tensor in images.items():
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
                continue
            grid = make_grid(tensor)
            path = self._image_dir(trainer) / f"{name}_{tag}_step{step:06d}.png"
            save_image(Image.fromarray(grid), path)
            self.saved.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=[Image.fromarray(grid)], step=step)
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, step, dataformats="HWC")
        return images

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_batch = batch
        step = trainer.global_step
        if trainer.sanity_checking or self.every_n_steps <= 0:
            return
        first = self.log_first_step and batch_idx == 0 and trainer.current_epoch == 0
        if first or (step > 0 and step % self.every_n_steps == 0 and step != self._logged_step):
            self._logged_step = step
            self.log_now(trainer, pl_module, batch, "train")

    def on_fit_end(self, trainer, pl_module):
        if self.log_on_fit_end and self._last_batch is not None:
            self.log_now(trainer, pl_module, self._last_batch, "final")
