"""A callback for the resume tests: the process signals itself at the start of a given global step,
as a cluster would (``SIGKILL``: no chance to save; ``SIGTERM``/``SIGUSR1``: preemption notice).
``group``: signal the whole process group (every DDP rank: a node lost), not only this process."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGKILL", group: bool = False):
        self.step, self.signum, self.group = step, getattr(signal, signal_name), group

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.group:
                os.killpg(os.getpgrp(), self.signum)
            os.kill(os.getpid(), self.signum)
