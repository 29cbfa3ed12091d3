"""A callback for the resume tests: the process signals itself at the start of a given global step,
as a cluster would (``SIGKILL``: no chance to save; ``SIGTERM``/``SIGUSR1``: preemption notice)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
