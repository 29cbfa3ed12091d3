"""``model.compile`` for the LightningModules: compile a network in place before fitting, and report what
the compile cost.

torch.compile compiles lazily, at the first forward (and the first backward), so its cost shows as a slow
first training step. ``CompileClock`` measures it the way a user sees it: the first step's wall time minus
the second's, logged once ("compiled the UNet (blocks, 28 blocks) in 345.2 s") and kept for the run summary.
"""

from __future__ import annotations

import time

from torch import nn

from ldm.modules.compile import compile_in_place
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class CompileClock:
    """Times the first two training steps of a compiled network: ``start()`` / ``stop()`` around each (the
    owner's ``on_train_batch_start`` / ``on_train_batch_end``: validation between them is not counted)."""

    def __init__(self, what: str, mode: str, count: int):
        self.what, self.mode, self.count = what, mode, count
        self.steps: list[float] = []
        self._started: float | None = None
        self.seconds: float | None = None  # compile time, once two steps have run

    def start(self) -> None:
        if self.seconds is None:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.seconds is not None or self._started is None:
            return
        self.steps.append(time.perf_counter() - self._started)
        self._started = None
        if len(self.steps) == 2:
            first, second = self.steps
            self.seconds = max(0.0, first - second)
            log.info(f"{self.summary()} (first step {first:.1f} s, then {second:.2f} s/step)")

    def summary(self) -> str:
        """One line for logs and the run summary."""
        blocks = f", {self.count} blocks" if self.mode == "blocks" else ""
        if self.seconds is None:
            return f"compiled {self.what} ({self.mode}{blocks}); compile time not measured (under 2 steps)"
        return f"compiled {self.what} ({self.mode}{blocks}) in {self.seconds:.1f} s"


def compile_network(
    owner: nn.Module, network: nn.Module, what: str, mode: str | None, backend: str
) -> CompileClock | None:
    """Compile ``network`` in place (once: a second call, e.g. ``configure_model`` on a resumed fit, finds
    ``owner.compile_clock`` set) and return the clock the owner starts and stops around each training step."""
    if mode is None:
        return None
    clock = getattr(owner, "compile_clock", None)
    if clock is not None:
        return clock
    count = compile_in_place(network, mode, backend)
    log.info(f"torch.compile ({backend}) of {what}: {mode}, {count} module(s); compiled at the first step")
    return CompileClock(what, mode, count)
