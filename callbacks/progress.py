"""A rich progress bar that counts optimiser steps when training is bounded by ``trainer.max_steps``.

Lightning's bar counts batches of the current epoch and reads ``Epoch 5/-2`` under ``max_epochs=-1``;
every experiment here is step-bounded, so the bar shows ``step 1200/3000`` instead, and drops the logger
version (``v_num``) that says nothing to a user.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _step_bounded(self) -> bool:
        trainer = self.trainer
        return trainer.max_steps is not None and trainer.max_steps > 0 and not trainer.fast_dev_run

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._step_bounded() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._step_bounded():
            description = "Training"
        elif self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description = f"Epoch {current_epoch}/{self.trainer.max_epochs - 1}"
        else:
            description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"

    def _update(self, progress_bar_id, current: int, visible: bool = True, hard: bool = False) -> None:
        if (
            progress_bar_id is not None
            and progress_bar_id == self.train_progress_bar_id
            and self._step_bounded()
        ):
            current = self.trainer.global_step  # steps so far, across epochs and resumes
        super()._update(progress_bar_id, current, visible, hard)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
