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
from ldm.io.strict_load import state_dict_mismatches
from ldm.utils.files import atomic_write

__all__ = ["SafeCheckpointIO", "checkpoint_plugins", "explain_resume_mismatch", "load_training_checkpoint"]

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


# what a checkpoint's top-level modules say it is (first match wins)
_KINDS = (
    ({"method"}, "a fine-tuning checkpoint (an adapter)"),
    ({"unet", "vae"}, "a text-to-image model"),
    ({"vae"}, "a VAE (autoencoder)"),
    ({"encoder", "decoder"}, "a VAE (autoencoder)"),
)


def _prefixes(keys) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in keys})


def _held(payload: dict) -> str:
    """What a training checkpoint holds, in words: its model's class (``model_config``) or its modules."""
    state = payload.get("state_dict", {})
    target = str((payload.get("model_config") or {}).get("_target_", "")).rsplit(".", 1)[-1]
    prefixes = set(_prefixes(state))
    kind = next((words for needed, words in _KINDS if needed <= prefixes), "weights")
    return f"{kind}{f' ({target})' if target else ''}, modules {', '.join(sorted(prefixes))}"


def explain_resume_mismatch(error: BaseException, path: str | os.PathLike | None, model) -> ValueError | None:
    """For the ``RuntimeError`` of resuming ``path`` into a ``model`` of another architecture (``Error(s) in
    loading state_dict``: one line per key, 184 for a VAE into txt2img), one line naming the file, what it
    holds and what the run expects; None for any other error."""
    if not path or "Error(s) in loading state_dict" not in str(error):
        return None
    try:
        payload = safe_torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - the original error stands
        return None
    state = payload.get("state_dict", {}) if isinstance(payload, dict) else {}
    expected = model.state_dict()
    problems = state_dict_mismatches(expected, state, limit=2)
    return ValueError(
        f"ckpt_path={path} does not fit this run: it holds {_held(payload)} ({len(state)} tensors); this run "
        f"builds {type(model).__name__}, modules {', '.join(_prefixes(expected))} ({len(expected)} tensors). "
        f"Differences: {problems}. Resume a checkpoint of this experiment with the model options it was "
        "trained with (see its run's .hydra/config.yaml), or drop ckpt_path to start a new run"
    )
