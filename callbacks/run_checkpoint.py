"""Lightning's ModelCheckpoint with four guarantees the stock one lacks.

* ``last.ckpt`` is the latest state: every checkpoint event (validation, epoch end) rewrites it, not only
  those that find a new best, and at the end of training it is the final state (the stock callback keeps
  the last *improving* checkpoint).
* A state whose monitored metric is NaN/inf never becomes best or last (a warning names the step); the
  stock callback ranks NaN as worst but still saves it, and always refreshes ``last.ckpt``.
* ``last.ckpt`` is always that name: a run resumed into its own folder rewrites it (the stock callback's
  version counter wrote ``last-v1.ckpt`` when the state it resumed from did not name ``last.ckpt`` as its last
  file, e.g. a first checkpoint linked to the best, and left ``ckpt_path=last`` on the stale one).
* No second write: when a new best was just saved for this step, ``last.ckpt`` becomes a hard link to it
  (a full fine-tune of SD writes GBs per checkpoint); the next save replaces the link, and removing the old
  best leaves ``last.ckpt`` whole.
* Preemption: on SIGTERM (Lightning stops after the current batch) and SIGUSR1 (turned into SIGTERM),
  ``last.ckpt`` is written before the process exits (status 143), so ``ckpt_path=last`` resumes at the next
  batch. In a SLURM job with auto-requeue, SIGUSR1 stays Lightning's (hpc checkpoint + requeue).
"""

from __future__ import annotations

import math
import os
import signal
import threading

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ldm.utils.files import atomic_link
from ldm.utils.logging import get_logger

log = get_logger(__name__)


def _resend_as_sigterm(signum, frame) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) + final ``last.ckpt``, no non-finite best/last, preemption save.

    Args:
        preemption_signals: signal names that write ``last.ckpt`` and stop the run (SIGTERM is handled by
            Lightning itself; the others are forwarded to it).
    """

    def __init__(self, *args, preemption_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), **kwargs):
        super().__init__(*args, **kwargs)
        self.preemption_signals = tuple(preemption_signals)
        self._previous_handlers: dict[int, object] = {}
        self._warned_step = -1

    # -- non-finite metrics ---------------------------------------------------------------------------
    def _monitor_is_finite(self, trainer, monitor_candidates: dict) -> bool:
        value = monitor_candidates.get(self.monitor) if self.monitor else None
        if value is None:
            return True
        finite = math.isfinite(float(torch.as_tensor(value).float().mean()))
        if not finite and self._warned_step != trainer.global_step:
            self._warned_step = trainer.global_step
            log.warning(
                f"{self.monitor}={float(value)} at global step {trainer.global_step}: not saving this "
                "state as a checkpoint (best and last keep the previous finite one)"
            )
        return finite

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._monitor_is_finite(trainer, monitor_candidates):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if not self._monitor_is_finite(trainer, monitor_candidates):
            return
        just_saved = self._last_checkpoint_saved and self._last_global_step_saved == trainer.global_step
        files = "deepspeed" not in type(trainer.strategy).__name__.lower()  # DeepSpeed saves folders
        link = self.save_last is True and just_saved and files
        save_last, versioned = self.save_last, self._enable_version_counter
        # Lightning's branch linking last to the file saved last
        self.save_last = "link" if link else save_last
        self._enable_version_counter = False  # last.ckpt is replaced, never joined by last-v1.ckpt
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self.save_last, self._enable_version_counter = save_last, versioned

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """A hard link (Lightning's: a symlink, which dangles once the old best is removed), atomically."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_link(filepath, linkpath)
        trainer.strategy.barrier()

    # -- last.ckpt is the latest state, and the final one ------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(
            trainer
        )
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, due)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(
            trainer
        )
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, due)

    def _refresh_last(self, trainer, due: bool) -> None:
        """The stock callback rewrites last.ckpt only when a top-k file was saved (a new best); here every
        checkpoint event does, so ``ckpt_path=last`` resumes from the latest state."""
        if due and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- preemption ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.forwarded_signals(trainer):
            self._previous_handlers[signum] = signal.signal(signum, _resend_as_sigterm)

    def forwarded_signals(self, trainer) -> list[int]:
        """The preemption signals this callback turns into SIGTERM: not SIGTERM itself (Lightning's), and not
        the requeue signal of a SLURM job with auto-requeue (Lightning saves an hpc checkpoint and
        requeues)."""
        environment = getattr(trainer.strategy, "cluster_environment", None)
        requeue = environment.requeue_signal if isinstance(environment, SLURMEnvironment) else None
        if requeue is not None and not environment.auto_requeue:
            requeue = None
        found = [getattr(signal, name, None) for name in self.preemption_signals]
        return [
            s
            for s in found
            if s is not None and s not in (signal.SIGTERM, requeue) and s not in self._previous_handlers
        ]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or "SIGTERM" not in self.preemption_signals:
            super().on_exception(trainer, pl_module, exception)
            return
        exception.code = 128 + signal.SIGTERM  # exit status 143, not 0: scripts must not take it as finished
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            log.warning(
                f"Stopped by a signal at global step {trainer.global_step}; saved {self.last_model_path}. "
                "Resume with ckpt_path=last (or ckpt_path=<that file>)."
            )
