"""Test helper (instantiated by Hydra in subprocesses): each rank writes its final weights at the end of
fit."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback


class DumpState(Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_end(self, trainer, pl_module):
        self.path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.path / f"rank{trainer.global_rank}.pt")
