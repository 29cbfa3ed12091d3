"""Make ``ckpt_path=...`` continue exactly where the checkpoint was written.

Lightning restores weights, optimisers, schedulers and loop counters, but not the global random number
generators, and a shuffling DataLoader restarts its epoch from the first batch. This callback

* stores the Python / NumPy / torch / CUDA RNG states in every checkpoint and restores them right before
  the first training batch after a resume (after the sanity check, so nothing in between draws from them);
* tells the training loader (:class:`datamodules.resumable.ResumableDataLoader`) how many batches the
  training step has consumed, so the loader state in the checkpoint points at the next batch.

Together with a deterministic dataset, a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L

from datamodules.resumable import ResumableDataLoader
from ldm.utils.logging import get_logger
from ldm.utils.rng import get_rng_states, set_rng_states

log = get_logger(__name__)


def _resumable_loaders(loaders) -> list[ResumableDataLoader]:
    if isinstance(loaders, ResumableDataLoader):
        return [loaders]
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence):
        return [dl for item in loaders for dl in _resumable_loaders(item)]
    return []


class ExactResume(L.Callback):
    def __init__(self):
        self._rng_to_restore: dict | None = None
        self._warned = False

    def state_dict(self) -> dict:
        return {"rng_states": get_rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng_to_restore = state_dict.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _resumable_loaders(trainer.train_dataloader) and not self._warned:
            self._warned = True
            log.info(
                "The training loader is not resumable (see datamodules/resumable.py): a resume mid-epoch "
                "restarts that epoch's data order."
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for loader in _resumable_loaders(trainer.train_dataloader):
            loader.mark_consumed(trainer.current_epoch, batch_idx + 1, trainer.num_training_batches)
