"""Tell what a base-model source is, and load the formats other tools write.

``source`` may be
  * a Stable Diffusion single file (SD 1.x, 2.x, SDXL base or the SDXL refiner): ``.safetensors``
    (preferred) or a weights-only ``.ckpt``/``.pt``/``.pth``;
  * one of our Lightning checkpoints (``.ckpt`` carrying ``model_config``, written by ``train.py``): only
    identified here; ``ldm.models.base_loader.load_base_model`` rebuilds it (that needs the models layer);
  * a diffusers folder (with ``model_index.json``; SD 1.x, 2.x, SDXL base or the SDXL refiner);
  * a Hugging Face Hub id such as ``runwayml/stable-diffusion-v1-5`` (downloaded when online; with
    ``HF_HUB_OFFLINE=1`` only the local cache is used, and a miss is a fast, clear error).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.io.components import SDComponents
from ldm.io.diffusers_folder import download_from_hub, load_diffusers_folder
from ldm.io.safe_load import PICKLE_SUFFIXES, safe_torch_load, unwrap_state_dict
from ldm.io.single_file import load_single_file
from ldm.utils.hub import looks_like_hub_id
from ldm.utils.plain import to_plain

__all__ = [
    "COMMON_OVERRIDES",
    "PretrainedSource",
    "check_overrides",
    "identify_source",
    "is_lightning_checkpoint",
    "load_pretrained",
    "plain_overrides",
]

COMMON_OVERRIDES = ("parameterization", "scale_factor", "resolution", "schedule")
_SINGLE_FILE_OVERRIDES = (
    *COMMON_OVERRIDES,
    "preset",
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
)
LIGHTNING_CONFIG_KEY = "model_config"


@dataclasses.dataclass
class PretrainedSource:
    """What ``identify_source`` found. ``kind``: ``"safetensors"``, ``"pickle"`` (an SD single file, already
    read into ``payload``), ``"lightning"`` (ours), ``"diffusers"`` (a folder) or ``"hub"`` (an id)."""

    kind: str
    text: str
    path: Path | None = None
    payload: Any = None


def identify_source(source: str | os.PathLike) -> PretrainedSource:
    """Classify ``source`` (see the module docstring); each file is read at most once (pickles, memory-mapped,
    to look for ``model_config``). Raises ``FileNotFoundError``/``ValueError`` for anything else."""
    text = os.fspath(source).strip()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            return PretrainedSource("safetensors", text, path)
        if path.suffix not in PICKLE_SUFFIXES:
            raise ValueError(
                f"{text}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt"
            )
        payload = safe_torch_load(path, mmap=True)
        if is_lightning_payload(payload):
            return PretrainedSource("lightning", text, path, payload)
        return PretrainedSource("pickle", text, path, payload)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{text} is a folder without model_index.json: not a diffusers model folder "
                "(pass a .safetensors/.ckpt file, a diffusers folder or a hub id)"
            )
        return PretrainedSource("diffusers", text, path)
    if looks_like_hub_id(text):
        return PretrainedSource("hub", text)
    raise FileNotFoundError(
        f"base model {text!r} is neither an existing file or folder nor a hub id (organisation/name)"
    )


def load_pretrained(
    source: str | os.PathLike | PretrainedSource,
    use_ema: bool = True,
    dtype: torch.dtype | str | None = None,
    **preset_overrides: Any,
) -> SDComponents:
    """The ``SDComponents`` of an SD single file, a diffusers folder or a hub id (overrides as documented
    in ``ldm.models.base_loader.load_base_model``). Our Lightning checkpoints are refused here."""
    found = source if isinstance(source, PretrainedSource) else identify_source(source)
    overrides = plain_overrides(preset_overrides)
    if found.kind == "safetensors":
        check_overrides(overrides, _SINGLE_FILE_OVERRIDES, "a single file")
        return load_single_file(found.path, use_ema, dtype, **overrides)
    if found.kind == "pickle":
        check_overrides(overrides, _SINGLE_FILE_OVERRIDES, "a single file")
        state = unwrap_state_dict(found.payload, found.text)
        return load_single_file(state, use_ema, dtype, **overrides, name=found.text)
    if found.kind == "diffusers":
        check_overrides(overrides, ("variant", *COMMON_OVERRIDES), "a diffusers folder")
        return load_diffusers_folder(found.path, use_ema, dtype, **overrides)
    if found.kind == "hub":
        check_overrides(overrides, ("variant", "revision", *COMMON_OVERRIDES), "a hub id")
        revision = overrides.pop("revision", None)
        folder = download_from_hub(
            found.text, use_ema=use_ema, revision=revision, variant=overrides.get("variant")
        )
        return load_diffusers_folder(folder, use_ema, dtype, **overrides)
    raise ValueError(
        f"{found.text} is one of this project's Lightning checkpoints: load it with "
        "ldm.models.base_loader.load_base_model"
    )


def plain_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides without ``None`` values, Hydra containers turned into plain Python values."""
    return {k: to_plain(v) for k, v in overrides.items() if v is not None}


def check_overrides(overrides: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    """``TypeError`` naming the overrides that do not apply to ``what``."""
    extra = sorted(set(overrides) - set(allowed))
    if extra:
        raise TypeError(f"{extra} cannot be overridden for {what}; allowed: {sorted(allowed)}")


def is_lightning_payload(payload: Any) -> bool:
    """True for the content of one of our Lightning checkpoints (it carries ``model_config``)."""
    return isinstance(payload, Mapping) and LIGHTNING_CONFIG_KEY in payload


def is_lightning_checkpoint(path: str | os.PathLike) -> bool:
    """True for one of our Lightning checkpoints (a weights-only pickle with ``model_config``)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in PICKLE_SUFFIXES:
        return False
    try:
        payload = safe_torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - not ours (or unsafe): load_base_model gives the real error
        return False
    return is_lightning_payload(payload)
