"""``experiment=clip``: a small CLIP (``ldm.modules.shapes_clip.ShapesCLIP``) trained contrastively on
captioned images, as Stable Diffusion's text encoder was trained before the diffusion model that conditions
on it.

Logs ``train/loss``, ``val/loss`` and ``val/retrieval`` (top-1 image -> caption retrieval among the distinct
captions of the validation images, which training never saw). At the end of fit the model is saved as a
``CLIPModel`` folder with its processor (``export_dir``, default ``<run>/clip``): the metrics' ``--clip``, and
``experiment=txt2img``'s frozen text encoder (``model/text_encoder=shapes_clip``, ``ldm.modules.clip_run``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from ldm.modules.shapes_clip import ShapesCLIP, retrieval_accuracy
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class ContrastiveCLIP(L.LightningModule):
    def __init__(
        self,
        clip: ShapesCLIP,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["clip", "optimizer", "scheduler"], logger=False)
        self.clip = clip
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._val_features: list[torch.Tensor] = []
        self._val_captions: list[str] = []

    def training_step(self, batch, batch_idx):
        loss = self.clip.loss(batch["image"], list(batch["caption"]))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.clip.loss(batch["image"], list(batch["caption"]))
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        self._val_features.append(self.clip.image_features(batch["image"]))
        self._val_captions.extend(batch["caption"])

    def on_validation_epoch_end(self):
        if self._val_captions:
            features = torch.cat(self._val_features)
            accuracy = retrieval_accuracy(features, self._val_captions, self.clip.text_features)
            self.log("val/retrieval", accuracy, prog_bar=True)
        self._val_features, self._val_captions = [], []

    def on_train_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            folder = self.clip.save(Path(self.hparams.export_dir))
            log.info(f"CLIP saved to {folder} (--clip for the metrics; experiment=txt2img's text encoder)")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.clip.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return [optimizer], [{"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "step"}]
