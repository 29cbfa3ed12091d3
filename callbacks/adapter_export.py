"""Write the fine-tuning method's exchange file (kohya LoRA, embedding, hypernetwork, SD single file...):
every ``every_n_steps`` and at the end of fit, into ``<run>/adapters/``. Rank zero only. The suffix is the
method's (``method.export_suffix``) unless given."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ldm.utils.logging import get_logger

log = get_logger(__name__)


class AdapterExport(L.Callback):
    def __init__(
        self,
        name: str = "adapter",
        every_n_steps: int = 0,
        suffix: str | None = None,
        dirpath: str | None = None,
    ):
        self.name, self.every_n_steps, self.suffix, self.dirpath = name, every_n_steps, suffix, dirpath
        self.exported: list[Path] = []

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "adapters")

    @rank_zero_only
    def export(self, trainer: L.Trainer, pl_module, filename: str) -> Path:
        suffix = self.suffix or pl_module.method.export_suffix
        path = pl_module.export(self._dir(trainer) / f"{filename}{suffix}")
        self.exported.append(Path(path))
        log.info(f"Exported adapter to {path}")
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.export(trainer, pl_module, f"{self.name}-step{step:06d}")

    def on_fit_end(self, trainer, pl_module):
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            self.export(trainer, pl_module, self.name)
