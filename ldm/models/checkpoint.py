"""Rebuild a trained model from one of our Lightning checkpoints (they carry their model config, which
``ldm.models.model_config`` checks against an allowlist before building anything)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.models.model_config import MODEL_TARGETS, build_from_config, check_config
from ldm.models.safe_checkpoint_io import load_training_checkpoint
from ldm.utils.logging import get_logger

log = get_logger(__name__)


def _upgraded(config: dict) -> dict:
    """A config written before ``prior_loss_weight`` moved from ``model.method`` to the fine-tuning core."""
    method = config.get("method")
    if isinstance(method, dict) and "prior_loss_weight" in method:
        method = dict(method)
        config = {**config, "method": method, "prior_loss_weight": method.pop("prior_loss_weight")}
    return config


def _for_inference(config: dict) -> dict:
    """Replace what is only needed to train (optimiser, LR schedule) by inert stand-ins."""
    config = _upgraded(dict(config))
    if "optimizer" in config:
        config["optimizer"] = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.0}
    if "scheduler" in config:
        config["scheduler"] = None
    return config


def load_lightning_model(
    path: str | Path, map_location: str | torch.device = "cpu", checkpoint: dict | None = None
):
    """A LightningModule from ``path`` (written by ``train.py``), in eval mode, weights loaded strictly.
    ``checkpoint``: the file's contents when the caller already read them (the file is then not read
    again)."""
    path = Path(path)
    # weights-only; damaged/foreign files named
    ckpt = dict(checkpoint) if checkpoint is not None else load_training_checkpoint(path)
    config = ckpt.get("model_config")
    if config is None:
        raise ValueError(
            f"{path} has no 'model_config': it was not written by this project's train.py "
            "(for Stable Diffusion files use a single-file or diffusers loader)"
        )
    check_config(config, str(path))  # the whole file's config, optimiser included, before anything is built
    if not isinstance(config, dict):
        build_from_config(config, str(path), top_level=MODEL_TARGETS)  # refuses: not a model's config
    model = build_from_config(_for_inference(config), str(path), top_level=MODEL_TARGETS)
    # as Lightning does on resume: the model's hook first (a fine-tune loads its base and method state there
    # and leaves nothing else), then the rest of the weights, strictly
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=model.strict_loading)
    model.to(map_location)
    model._vae_loaded = True
    model.model_config = ckpt["model_config"]
    log.info(f"Loaded {type(model).__name__} from {path} (global step {ckpt.get('global_step')})")
    return model.eval()
