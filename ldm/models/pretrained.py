"""Find and load the pretrained parts a model builds on (the VAE of txt2img, the base of a fine-tune).

Rules: an explicit path wins; otherwise the newest run of the producing experiment is used and the choice
is logged; when there is none, a clear error says how to make one. Only under ``trainer.fast_dev_run``
may a missing part be replaced by its random initialisation (a plumbing check), with a warning.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ldm.io.safe_load import safe_torch_load
from ldm.utils.logging import get_logger
from ldm.utils.runs import latest_checkpoint

log = get_logger(__name__)


def find_checkpoint(explicit: str | None, log_dir: str | Path, task_name: str, what: str,
                    allow_missing: bool = False) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
        return path
    found = latest_checkpoint(log_dir, task_name)
    if found is not None:
        log.info(f"Using the latest {what}: {found}")
        return found
    if allow_missing:
        log.warning(f"No {what} found under {Path(log_dir) / task_name}; fast_dev_run: using a RANDOM {what} "
                    "(plumbing check only, the results mean nothing)")
        return None
    raise FileNotFoundError(
        f"No {what} checkpoint given and none found under {Path(log_dir) / task_name}/runs/*/checkpoints/. "
        f"Train one first (python train.py experiment={task_name}) or pass its path explicitly."
    )


def load_prefixed_state(module: nn.Module, checkpoint: Path | str, prefix: str, what: str) -> None:
    """Load ``<prefix>.*`` tensors of a Lightning checkpoint into ``module``; strict, with a clear report."""
    ckpt = safe_torch_load(checkpoint)  # weights_only=True: a malicious pickle raises UnsafeCheckpointError
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} holds a {type(ckpt).__name__}, not a state dict: is it really a {what} "  # noqa: TRY004
                         "checkpoint?")
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not sub:
        raise ValueError(f"{checkpoint} holds no '{prefix}.*' weights: is it really a {what} checkpoint?")
    own = module.state_dict()
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    wrong = [(k, tuple(sub[k].shape), tuple(v.shape)) for k, v in own.items() if k in sub and sub[k].shape != v.shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append("shape mismatches (file vs model): " + ", ".join(f"{k} {a} vs {b}" for k, a, b in wrong[:5]))
        if missing:
            details.append(f"missing in file: {missing[:5]}")
        if unexpected:
            details.append(f"not in model: {unexpected[:5]}")
        raise ValueError(f"{what} checkpoint {checkpoint} does not match the configured architecture; "
                         + "; ".join(details)
                         + ". Use the same preset it was trained with (e.g. model/vae=...) or another checkpoint.")
    module.load_state_dict(sub, strict=True)
