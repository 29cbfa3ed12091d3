"""Rebuild a model from the config a file carries, without letting the file choose what code runs.

Our checkpoints carry ``model_config`` (the Hydra ``model`` node a run was built from). Handing it to
``hydra.utils.instantiate`` would call whatever ``_target_`` the file names with arguments the file chooses
(``builtins.open``, ``pathlib.Path.write_text``, ``shutil.rmtree`` ...). Here a config is first checked as a
whole, and only then built by code we own:

* every ``_target_`` (top level or nested) must be one of ``ALLOWED_TARGETS``: this project's model classes
  and factories and the optimisers our configs name, enumerated one by one (a module prefix such as ``ldm.``
  would still reach every function in it);
* every other value is plain data: ``None``, booleans, numbers, strings, lists and string-keyed dicts of them;
  the only other reserved key is ``_partial_`` (a boolean);
* anything else is refused with :class:`UnsafeConfigError` naming the file and the key, before anything is
  called.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from ldm.io.safe_load import UnsafeCheckpointError

__all__ = ["ALLOWED_TARGETS", "MODEL_TARGETS", "UnsafeConfigError", "build_from_config", "check_config"]

# target -> (module, attribute path inside it). Every ``_target_`` under conf/model is here (a test checks
# it), plus torch.optim.SGD, the inert optimiser a model rebuilt for inference gets.
ALLOWED_TARGETS: dict[str, tuple[str, str]] = {
    # LightningModules
    "ldm.models.autoencoder.AutoencoderModule": ("ldm.models.autoencoder", "AutoencoderModule"),
    "ldm.models.latent_diffusion.LatentDiffusion": ("ldm.models.latent_diffusion", "LatentDiffusion"),
    "ldm.models.finetune.module.FineTuneModule": ("ldm.models.finetune.module", "FineTuneModule"),
    "ldm.models.contrastive_clip.ContrastiveCLIP": ("ldm.models.contrastive_clip", "ContrastiveCLIP"),
    # fine-tuning methods
    "ldm.models.finetune.full.FullUNet": ("ldm.models.finetune.full", "FullUNet"),
    "ldm.models.finetune.hypernetwork.Hypernetwork": ("ldm.models.finetune.hypernetwork", "Hypernetwork"),
    "ldm.models.finetune.lora.LoRA": ("ldm.models.finetune.lora", "LoRA"),
    "ldm.models.finetune.pivotal.PivotalTuning": ("ldm.models.finetune.pivotal", "PivotalTuning"),
    "ldm.models.finetune.textual_inversion.TextualInversion": (
        "ldm.models.finetune.textual_inversion",
        "TextualInversion",
    ),
    # networks
    "ldm.modules.unet.UNetModel": ("ldm.modules.unet", "UNetModel"),
    "ldm.modules.vae.AutoencoderKL": ("ldm.modules.vae", "AutoencoderKL"),
    "ldm.modules.discriminator.PatchDiscriminator": ("ldm.modules.discriminator", "PatchDiscriminator"),
    "ldm.modules.lpips.LPIPS.from_files": ("ldm.modules.lpips", "LPIPS.from_files"),
    "ldm.modules.text_encoder.CLIPTextEncoder.from_pretrained": (
        "ldm.modules.text_encoder",
        "CLIPTextEncoder.from_pretrained",
    ),
    "ldm.modules.text_encoder.CLIPTextEncoder.tiny": ("ldm.modules.text_encoder", "CLIPTextEncoder.tiny"),
    "ldm.modules.text_encoder.CLIPTextEncoder.from_config": (
        "ldm.modules.text_encoder",
        "CLIPTextEncoder.from_config",
    ),
    "ldm.modules.text_encoder_pooled.PooledCLIPTextEncoder.tiny": (
        "ldm.modules.text_encoder_pooled",
        "PooledCLIPTextEncoder.tiny",
    ),
    "ldm.modules.text_encoder_pooled.PooledCLIPTextEncoder.from_config": (
        "ldm.modules.text_encoder_pooled",
        "PooledCLIPTextEncoder.from_config",
    ),
    "ldm.modules.shapes_clip.ShapesCLIP": ("ldm.modules.shapes_clip", "ShapesCLIP"),
    "ldm.modules.clip_run.clip_text_encoder": ("ldm.modules.clip_run", "clip_text_encoder"),
    "ldm.modules.size_embedding.SizeEmbedding": ("ldm.modules.size_embedding", "SizeEmbedding"),
    "ldm.modules.conditioner.Conditioner": ("ldm.modules.conditioner", "Conditioner"),
    "ldm.modules.conditioner.embedder": ("ldm.modules.conditioner", "embedder"),
    # diffusion: schedule and samplers
    "ldm.diffusion.DiffusionSchedule.from_config": ("ldm.diffusion", "DiffusionSchedule.from_config"),
    "ldm.diffusion.DDIMSampler": ("ldm.diffusion", "DDIMSampler"),
    "ldm.diffusion.DDPMSampler": ("ldm.diffusion", "DDPMSampler"),
    "ldm.diffusion.SigmaSampler": ("ldm.diffusion", "SigmaSampler"),
    # optimisers and learning-rate schedules (``_partial_: true`` factories)
    "torch.optim.SGD": ("torch.optim", "SGD"),
    "torch.optim.Adam": ("torch.optim", "Adam"),
    "torch.optim.AdamW": ("torch.optim", "AdamW"),
    "transformers.optimization.Adafactor": ("transformers.optimization", "Adafactor"),
    "ldm.models.optimizers.adamw_8bit": ("ldm.models.optimizers", "adamw_8bit"),
    "ldm.models.optimizers.prodigy": ("ldm.models.optimizers", "prodigy"),
    "ldm.models.optimizers.schedulefree_adamw": ("ldm.models.optimizers", "schedulefree_adamw"),
    "ldm.models.optimizers.lion": ("ldm.models.optimizers", "lion"),
    "ldm.models.lr_schedules.warmup_cosine": ("ldm.models.lr_schedules", "warmup_cosine"),
}

# what a checkpoint's model_config may build at its top level: one of our LightningModules
MODEL_TARGETS = (
    "ldm.models.autoencoder.AutoencoderModule",
    "ldm.models.latent_diffusion.LatentDiffusion",
    "ldm.models.finetune.module.FineTuneModule",
    "ldm.models.contrastive_clip.ContrastiveCLIP",
)
_PLAIN_SCALARS = (type(None), bool, int, float, str)
_RESERVED_KEYS = {"_target_", "_partial_"}


class UnsafeConfigError(UnsafeCheckpointError):
    """A config read from a file names a callable we do not build, or holds something other than plain
    data."""


def _refuse(source: str, key: str, what: str) -> UnsafeConfigError:
    return UnsafeConfigError(
        f"{source}: refusing to build its config: {key} {what}. A checkpoint may name only this project's "
        "own model classes and plain values; this file was not written by our train.py or was altered"
    )


def check_config(node: Any, source: str, key: str = "model_config") -> None:
    """Raise :class:`UnsafeConfigError` unless ``node`` is plain data whose every ``_target_`` is allowed."""
    if isinstance(node, _PLAIN_SCALARS):
        return
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            check_config(item, source, f"{key}[{i}]")
        return
    if not isinstance(node, Mapping):
        raise _refuse(source, key, f"holds a {type(node).__name__}, not plain data")
    for name, value in node.items():
        if not isinstance(name, str):
            raise _refuse(source, key, f"has a non-string key {name!r}")
        if name.startswith("_") and name.endswith("_") and name not in _RESERVED_KEYS:
            raise _refuse(source, f"{key}.{name}", "is not a key this project's configs use")
    target = node.get("_target_")
    if target is not None and (not isinstance(target, str) or target not in ALLOWED_TARGETS):
        raise _refuse(
            source, f"{key}._target_", f"names {target!r}, which is not one of this project's models"
        )
    if "_partial_" in node and not isinstance(node["_partial_"], bool):
        raise _refuse(source, f"{key}._partial_", "must be true or false")
    for name, value in node.items():
        if name not in _RESERVED_KEYS:
            check_config(value, source, f"{key}.{name}")


def _resolve(target: str) -> Callable:
    module_name, attribute = ALLOWED_TARGETS[target]
    found: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def _build(node: Any) -> Any:
    if isinstance(node, list | tuple):
        return [_build(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    arguments = {name: _build(value) for name, value in node.items() if name not in _RESERVED_KEYS}
    if "_target_" not in node:
        return arguments
    factory = _resolve(node["_target_"])
    return functools.partial(factory, **arguments) if node.get("_partial_") else factory(**arguments)


def build_from_config(config: Mapping, source: str, top_level: tuple[str, ...] | None = None) -> Any:
    """The object ``config`` describes (Hydra's ``instantiate(config, _convert_="all")`` semantics for the
    ``_target_`` / ``_partial_`` keys), after :func:`check_config` found nothing to refuse. ``source`` (the
    file's path) is named in errors. ``top_level``: the targets the config itself may name (e.g.
    ``MODEL_TARGETS``)."""
    check_config(config, source)
    target = config.get("_target_") if isinstance(config, Mapping) else None
    if top_level is not None and target not in top_level:
        raise _refuse(source, "model_config._target_", f"is {target!r}, not one of {', '.join(top_level)}")
    return _build(config)
