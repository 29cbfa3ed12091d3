"""The thread policy while a run trains: torch's intra-op threads follow the cores other processes leave
free (``ldm.utils.threads.AdaptiveThreads``), re-decided every couple of seconds between batches.

``train.py`` adds it when the policy chose the thread count and this process has the cores to itself (one
rank); your own ``OMP_NUM_THREADS`` fixes the count instead. The run summary says how often it changed.
"""

from __future__ import annotations

import lightning as L

from ldm.utils.logging import get_logger
from ldm.utils.threads import AdaptiveThreads

log = get_logger(__name__)


class AdaptiveThreadsCallback(L.Callback):
    def __init__(self, adapter: AdaptiveThreads | None = None) -> None:
        self.adapter = adapter or AdaptiveThreads()
        self.lowest = self.adapter.threads

    def _step(self) -> None:
        threads = self.adapter.step()
        if threads is not None:
            self.lowest = min(self.lowest, threads)
            log.debug(f"threads: {threads} intra-op (other processes' load changed)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._step()

    def thread_summary(self) -> str:
        """One line for the run summary."""
        if not self.adapter.changes:
            return f"threads: {self.adapter.threads} throughout (no other process took a core)"
        return (
            f"threads: changed {self.adapter.changes} time(s) with the machine's load "
            f"({self.lowest}-{self.adapter.cores}; now {self.adapter.threads})"
        )
