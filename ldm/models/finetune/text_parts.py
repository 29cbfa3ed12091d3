"""What the fine-tuning methods need to know about the base's conditioner: its text encoders by the names
files use (``text_encoder``, and SDXL's ``text_encoder_2``: diffusers' / PEFT's component names, kohya's
``lora_te1_`` / ``lora_te2_``), which family the base is (``sd``: one text encoder, SD 1.x / 2.x; ``sdxl``:
two, the second pooled), and SDXL's size conditions for batches that carry none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.utils.logging import get_logger

log = get_logger(__name__)

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
FAMILY_NAMES = {"sd": "an SD 1.x/2.x model (one text encoder)", "sdxl": "an SDXL model (two text encoders)"}


def text_parts(model) -> dict[str, nn.Module]:
    """``{"text_encoder": first, "text_encoder_2": second, ...}``: the conditioner's text embedders, in
    order."""
    conditioner = getattr(model, "conditioner", None)  # a bare host with .text_encoder: that one
    texts = conditioner.text_embedders if conditioner is not None else [model.text_encoder]
    return {("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): t for i, t in enumerate(texts)}


def family_of(conditioner) -> str:
    return "sdxl" if len(conditioner.text_embedders) > 1 else "sd"


def check_family(conditioner, expected: str | None, source: str | None) -> None:
    """``model.base_family`` (a preset's family) against the loaded base: one clear error when they differ.
    The SDXL refiner (it reads an aesthetic score) is not fine-tuned here, whatever the family."""
    if "aesthetic_score" in conditioner.input_keys:
        raise ValueError(
            f"model.base {source!r} is an SDXL refiner, which these fine-tuning presets do not train: "
            "fine-tune the SDXL base (lora_sdxl, dreambooth_sdxl, ...) and refine its images with "
            "sample.py --ckpt <refiner> --init-image <image> (docs/real_models.md)"
        )
    if expected is None:
        return
    found = family_of(conditioner)
    if found != expected:
        preset = "lora_sdxl, dreambooth_sdxl, ..." if found == "sdxl" else "lora_sd15, dreambooth_sd15, ..."
        raise ValueError(
            f"model.base {source!r} is {FAMILY_NAMES[found]}, but this experiment is for "
            f"{FAMILY_NAMES[expected]} (model.base_family={expected}): use a {expected} base, or the "
            f"{found} presets ({preset})"
        )


def fill_size_conditions(batch: Mapping[str, Any], keys, size: tuple[int, int]) -> dict:
    """``batch`` plus the SDXL size keys among ``keys`` that it lacks (data without size conditions, e.g. a
    hf_dataset or shards source): original = target = the image size ``(h, w)``, crop (0, 0) -- the
    sampling defaults. Logged once per run."""
    missing = [k for k in SIZE_KEYS if k in keys and k not in batch]
    if not missing:
        return dict(batch)
    n = len(batch["caption"])
    value = {"crop_coords_top_left": (0, 0)}
    if not getattr(fill_size_conditions, "warned", False):
        log.warning(
            f"the training batches carry no {missing}: using original = target = {size}, crop (0, 0) "
            "(set the data's size_conditions=true to condition on the crops really taken)"
        )
        fill_size_conditions.warned = True
    return {**batch, **{k: torch.tensor([value.get(k, size)] * n) for k in missing}}
