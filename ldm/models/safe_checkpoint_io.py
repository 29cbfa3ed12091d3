"""How ``trainer.fit(ckpt_path=...)`` and every checkpoint save touch the disk.

* Loading (resume, ``trainer.test(ckpt_path=best)``) goes through the project's safe loader: an explicit
  ``torch.load(weights_only=True)`` (so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot turn it off), a pickle
  needing anything beyond tensors and plain containers raises ``UnsafeCheckpointError`` before any of its
  code runs, and a text file or a truncated checkpoint gives an error naming the file.
* Saving writes a unique temporary file beside the target and ``os.replace``\\ s it, so a kill mid-write
  leaves the previous ``last.ckpt`` intact instead of a truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.io.safe_load import safe_torch_load
from ldm.utils.files import atomic_write

__all__ = ["SafeCheckpointIO", "checkpoint_plugins", "load_training_checkpoint"]

# The file Lightning's multiprocessing launcher (ddp_spawn, ddp_fork) writes for the main process: the model's
# state_dict, not a training checkpoint.
SPAWN_HANDBACK = ".temp.ckpt"


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, read weights-only, with clear errors for damaged or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(
            f"{path} is not a Lightning training checkpoint (no 'state_dict'); resume needs a "
            "<run>/checkpoints/*.ckpt written by train.py"
        )
    return payload


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with weights-only loading and atomic saving (local paths only)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if Path(path).name == SPAWN_HANDBACK:  # trainer.strategy=ddp_spawn|ddp_fork: rank 0's final weights
            return safe_torch_load(path)
        return load_training_checkpoint(path)  # on the CPU; Lightning moves what it restores


def checkpoint_plugins(trainer_cfg) -> list:
    """The Trainer ``plugins`` train.py adds: :class:`SafeCheckpointIO`, except under DeepSpeed (which reads
    and writes its own sharded checkpoint folders) or when the config already names plugins."""
    strategy = str(trainer_cfg.get("strategy", "") or "")
    if "deepspeed" in strategy.lower() or trainer_cfg.get("plugins"):
        return list(trainer_cfg.get("plugins") or [])
    return [SafeCheckpointIO()]
