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


def find_checkpoint(
    explicit: str | None, log_dir: str | Path, task_name: str, what: str, allow_missing: bool = False
) -> Path | None:
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
        log.warning(
            f"No {what} found under {Path(log_dir) / task_name}; fast_dev_run: using a RANDOM {what} "
            "(plumbing check only, the results mean nothing)"
        )
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
        raise ValueError(  # noqa: TRY004
            f"{checkpoint} holds a {type(ckpt).__name__}, not a state dict: is it really a {what} checkpoint?"
        )
    sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not sub:
        raise ValueError(f"{checkpoint} holds no '{prefix}.*' weights: is it really a {what} checkpoint?")
    own = module.state_dict()
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    wrong = [
        (k, tuple(sub[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in sub and sub[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        if prefix == "vae":
            hint = vae_mismatch_hint(sub, own, checkpoint)
            if hint:
                raise ValueError(hint)
        details = []
        if wrong:
            details.append(
                "shape mismatches (file vs model): " + ", ".join(f"{k} {a} vs {b}" for k, a, b in wrong[:5])
            )
        if missing:
            details.append(f"missing in file: {missing[:5]}")
        if unexpected:
            details.append(f"not in model: {unexpected[:5]}")
        raise ValueError(
            f"{what} checkpoint {checkpoint} does not match the configured architecture; "
            + "; ".join(details)
            + ". Use the same preset it was trained with (e.g. model/vae=...) or another checkpoint."
        )
    module.load_state_dict(sub, strict=True)


def vae_geometry(state: dict) -> tuple[int, int] | None:
    """(downsampling factor f, latent channels c) of a VAE state dict (our/LDM key names), or None."""
    levels = {k.split(".")[2] for k in state if k.startswith("encoder.down.")}
    quant = state.get("quant_conv.weight")
    if not levels or quant is None:
        return None
    return 2 ** (len(levels) - 1), int(quant.shape[0]) // 2


def vae_mismatch_hint(file_state: dict, own_state: dict, checkpoint: Path | str) -> str | None:
    """'this VAE is f8, the config expects f4; pass model/vae=f8 or model.vae_ckpt=...' when the VAE's
    geometry (f, c) differs from the configured one; None when the geometry agrees (other mismatch)."""
    theirs, ours = vae_geometry(file_state), vae_geometry(own_state)
    if theirs is None or ours is None or theirs == ours:
        return None
    preset = run_choice(checkpoint, "model/vae")
    trained_with = f"model/vae={preset}" if preset else "the model/vae preset it was trained with"
    return (
        f"the VAE checkpoint {checkpoint} is f={theirs[0]}, c={theirs[1]}, but the configured model/vae is "
        f"f={ours[0]}, c={ours[1]}: pass {trained_with}, or model.vae_ckpt=<a f={ours[0]}, c={ours[1]} VAE "
        "checkpoint>"
    )


def run_choice(checkpoint: Path | str, group: str) -> str | None:
    """The config-group choice (e.g. ``model/vae`` -> ``f8``) of the run that wrote ``checkpoint``, read from
    ``<run>/.hydra/hydra.yaml`` next to ``<run>/checkpoints/``; None when unknown."""
    from omegaconf import OmegaConf

    hydra_yaml = Path(checkpoint).resolve().parent.parent / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    try:
        choices = OmegaConf.load(hydra_yaml).hydra.runtime.choices
        return str(choices[group]) if group in choices else None
    except Exception:  # noqa: BLE001  (a damaged or foreign hydra.yaml only costs the hint)
        return None
