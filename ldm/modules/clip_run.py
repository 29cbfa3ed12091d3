"""The frozen text tower of a CLIP trained by ``experiment=clip``: txt2img's text encoder, as Stable Diffusion
was built (a CLIP trained first, then frozen; ``conf/model/text_encoder/shapes_clip.yaml``).

``clip_text_encoder(path=None)`` finds the newest ``<search_dir>/<task>/runs/*/clip/text_encoder`` (the way
txt2img finds the newest VAE run) and logs ``text encoder: <folder>``; an explicit ``path`` wins (a run
folder, its ``clip/`` folder or the ``text_encoder/`` folder); with neither, one error names the fixes.

A checkpoint must not depend on "the newest run" nor on the folder staying where it was: ``pin_clip_runs``
writes into the ``model_config`` a checkpoint carries the folder the encoder came from and, when the tower
has the embedded tiny encoder's tokenizer and shape (what ``experiment=clip`` trains), that shape
(``checkpoint_architecture``). Rebuilt from such a checkpoint whose CLIP folder is gone, the tower is built
to that shape and filled with the checkpoint's own weights (they are in its state dict, loaded strictly).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_clip import tiny_clip_tokenizer
from ldm.utils.logging import get_logger

__all__ = ["TARGET", "clip_text_encoder", "find_clip_text_encoder", "pin_clip_runs", "tiny_architecture"]

log = get_logger(__name__)

TARGET = "ldm.modules.clip_run.clip_text_encoder"
PATH_KEY = "model.conditioner.embedders.0.module.path"
FOLDER = Path("clip") / "text_encoder"  # inside a run: ContrastiveCLIP's export (ShapesCLIP.save)


def _text_encoder_folder(path: Path) -> Path | None:
    """The ``text_encoder/`` folder ``path`` names: itself, or inside a ``clip/`` folder or a run folder."""
    for folder in (path, path / "text_encoder", path / FOLDER):
        if (folder / "config.json").is_file():
            return folder
    return None


def newest_clip_run(search_dir: str | os.PathLike, task: str = "clip") -> Path | None:
    """The newest ``<search_dir>/<task>/runs/*/clip/text_encoder`` (by its config's modification time)."""
    found = (Path(search_dir) / task / "runs").glob(f"*/{FOLDER}/config.json")
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
    return newest.parent if newest is not None else None


def find_clip_text_encoder(
    path: str | os.PathLike | None, search_dir: str | os.PathLike, task: str = "clip"
) -> Path:
    """The text tower folder to load: ``path`` (a run, its ``clip/`` or ``clip/text_encoder/``) when given,
    else the newest CLIP run's; a ``FileNotFoundError`` naming the fixes when there is none."""
    if path:
        folder = _text_encoder_folder(Path(path))
        if folder is None:
            raise FileNotFoundError(
                f"{PATH_KEY}={path}: no CLIP text encoder there (no config.json in it, its text_encoder/ or "
                f"its {FOLDER}/). Point it at an experiment=clip run ({task}/runs/<run>/{FOLDER}), leave it "
                "null for the newest run, or use the random text encoder (model/text_encoder=tiny)"
            )
        return folder
    folder = newest_clip_run(search_dir, task)
    if folder is None:
        raise FileNotFoundError(
            f"txt2img conditions on a trained CLIP's frozen text tower, and no CLIP run was found under "
            f"{Path(search_dir) / task}/runs/*/{FOLDER}. Train one first "
            f"(python train.py experiment={task}), pass its folder ({PATH_KEY}=<run>/{FOLDER}), or "
            "condition on the random text encoder instead (model/text_encoder=tiny)"
        )
    return folder


def clip_text_encoder(
    path: str | os.PathLike | None = None,
    search_dir: str | os.PathLike = "logs",
    task: str = "clip",
    checkpoint_architecture: dict | None = None,
    **encoder_kwargs: Any,
) -> CLIPTextEncoder:
    """The frozen text tower of a CLIP run (see the module docstring). ``checkpoint_architecture``: written by
    ``pin_clip_runs`` into checkpoints only (the tiny shape to rebuild when the pinned folder is gone; the
    checkpoint's weights then fill it). ``encoder_kwargs``: ``max_length``, ``layer``, ``freeze``..."""
    if path and checkpoint_architecture and _text_encoder_folder(Path(path)) is None:
        log.warning(
            f"text encoder: the CLIP folder {path} is gone; rebuilding its architecture "
            "(the weights come from the checkpoint)"
        )
        kwargs = {k: v for k, v in encoder_kwargs.items() if k != "max_length"}
        encoder = CLIPTextEncoder.tiny(**checkpoint_architecture, **kwargs)
        encoder.clip_run = {"path": str(path), "architecture": dict(checkpoint_architecture)}
        return encoder
    folder = find_clip_text_encoder(path, search_dir, task).resolve()
    log.info(f"text encoder: {folder}")
    encoder = CLIPTextEncoder.from_pretrained(folder, **encoder_kwargs)
    encoder.clip_run = {"path": str(folder), "architecture": tiny_architecture(encoder)}
    return encoder


def tiny_architecture(encoder: CLIPTextEncoder) -> dict | None:
    """``CLIPTextEncoder.tiny``'s arguments that build ``encoder``'s network with its tokenizer (same
    vocabulary, parameter names and shapes, activation), or None when no such arguments exist."""
    config = encoder.transformer.config
    if encoder.tokenizer is None:
        return None
    tokenizer, _ = tiny_clip_tokenizer(None, int(config.max_position_embeddings))
    if tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
        return None
    architecture = {
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": int(config.num_attention_heads),
        "max_length": int(config.max_position_embeddings),
        "intermediate_size": int(config.intermediate_size),
    }
    shell = CLIPTextEncoder.tiny(**architecture)
    shapes = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    same = shapes == {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    return architecture if same and shell.transformer.config.hidden_act == config.hidden_act else None


def pin_clip_runs(model_config: dict, model: Any) -> dict:
    """``model_config`` (what a checkpoint carries) with each CLIP-run text embedder's ``path`` set to the
    folder it was built from and, when known, its ``checkpoint_architecture``; unchanged for other models."""
    conditioner = getattr(model, "conditioner", None)
    embedders = (model_config.get("conditioner") or {}).get("embedders")
    if conditioner is None or not isinstance(embedders, dict):
        return model_config
    built = [m.clip_run for m in conditioner.embedders if getattr(m, "clip_run", None)]
    keys = sorted(embedders, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, k))
    nodes = [k for k in keys if (embedders[k].get("module") or {}).get("_target_") == TARGET]
    if not nodes:
        return model_config
    pinned = copy.deepcopy(model_config)
    for key, source in zip(nodes, built):
        module = pinned["conditioner"]["embedders"][key]["module"]
        module["path"] = source["path"]
        if source["architecture"] is not None:
            module["checkpoint_architecture"] = source["architecture"]
    return pinned
