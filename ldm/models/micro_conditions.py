"""SDXL's size conditions at sampling time, and the UNet input from the conditioner's output.

Training batches carry each image's ``original_size_as_tuple`` (H, W before resizing),
``crop_coords_top_left`` (top, left of the crop in the resized image) and ``target_size_as_tuple`` (H, W of
the training image); see ``datamodules/transforms.py``. Sampling has no data, so ``sampling_batch`` fills
them: by default original = target = the output size and crop (0, 0) (what SDXL's pipeline does), each
settable (``sample.py
--original-size H W --crop-top-left T L --target-size H W``, ``model.log_sizes`` for logged grids).

The SDXL refiner reads original size, crop and an ``aesthetic_score`` (one number, sgm's name) instead of the
target size: 6.0 for the prompt and 2.5 for the negative prompt by default (diffusers'
``StableDiffusionXLImg2ImgPipeline``); ``aesthetic_score`` / ``negative_aesthetic_score`` set them
(``sample.py --aesthetic-score --negative-aesthetic-score``). ``negative_batch`` is the unconditional branch's
batch: the negative prompts and the negative score, the same sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "AESTHETIC_DEFAULTS",
    "AESTHETIC_KEY",
    "SIZE_KEYS",
    "negative_batch",
    "sampling_batch",
    "unet_condition",
    "unread_conditions",
]

# option name (sample.py / model.log_sizes) -> the batch key the size embedder reads (sgm's names)
SIZE_KEYS = {
    "original_size": "original_size_as_tuple",
    "crop_top_left": "crop_coords_top_left",
    "target_size": "target_size_as_tuple",
}

AESTHETIC_KEY = "aesthetic_score"  # the refiner's batch key
AESTHETIC_DEFAULTS = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}


def _pair(name: str, value: Any) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or min(values) < 0:
        raise ValueError(f"{name} must be two numbers >= 0 (height width, or top left), got {list(value)}")
    return values


def sampling_batch(
    input_keys: Sequence[str],
    prompts: Sequence[str],
    output_size: tuple[int, int],
    sizes: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """``{"caption": prompts}`` plus, for each size key an embedder reads (``input_keys``), a ``[B, 2]``
    tensor: ``sizes[name]`` where given (``original_size`` / ``crop_top_left`` / ``target_size``), else the
    default (original = target = ``output_size`` (H, W), crop (0, 0)); and the refiner's ``aesthetic_score``
    ``[B, 1]`` (``sizes["aesthetic_score"]``, default 6.0) when an embedder reads it."""
    sizes = {k: v for k, v in (sizes or {}).items() if v is not None}
    unknown = sorted(set(sizes) - set(SIZE_KEYS) - set(AESTHETIC_DEFAULTS))
    if unknown:
        expected = sorted([*SIZE_KEYS, *AESTHETIC_DEFAULTS])
        raise ValueError(f"unknown size option(s) {unknown}; expected some of {expected}")
    defaults = {"original_size": output_size, "crop_top_left": (0, 0), "target_size": output_size}
    batch: dict[str, Any] = {"caption": list(prompts)}
    for name, key in SIZE_KEYS.items():
        if key in input_keys:
            pair = _pair(name, sizes.get(name, defaults[name]))
            batch[key] = torch.tensor([pair] * len(prompts), device=device)
    if AESTHETIC_KEY in input_keys:
        batch[AESTHETIC_KEY] = _score(sizes, AESTHETIC_KEY, len(prompts), device)
    return batch


def unread_conditions(input_keys: Sequence[str], sizes: Mapping[str, Any] | None) -> list[str]:
    """The options of ``sizes`` given (not None) that no embedder of this model reads: the target size for
    the refiner, the aesthetic scores for anything but the refiner, every one for SD 1.x/2.x."""
    keys = {**SIZE_KEYS, **dict.fromkeys(AESTHETIC_DEFAULTS, AESTHETIC_KEY)}
    return [
        name
        for name, value in (sizes or {}).items()
        if value is not None and keys.get(name) not in input_keys
    ]


def negative_batch(
    batch: Mapping[str, Any], negatives: Sequence[str], sizes: Mapping[str, Any] | None
) -> dict:
    """The unconditional branch's batch: ``negatives`` as captions, the refiner's negative aesthetic score
    (``sizes["negative_aesthetic_score"]``, default 2.5) where the batch has a score, the same sizes."""
    result = {**batch, "caption": list(negatives)}
    if AESTHETIC_KEY in batch:
        result[AESTHETIC_KEY] = _score(
            sizes or {}, "negative_aesthetic_score", len(negatives), batch[AESTHETIC_KEY].device
        )
    return result


def _score(sizes: Mapping[str, Any], name: str, count: int, device) -> torch.Tensor:
    value = sizes.get(name)
    score = float(AESTHETIC_DEFAULTS[name] if value is None else value)
    return torch.full((count, 1), score, device=device)


def unet_condition(conditions: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The UNet's condition: the context alone (SD 1.x / 2.x), or ``{"context", "y"}`` with a vector
    (SDXL)."""
    if "vector" in conditions:
        return {"context": conditions["crossattn"], "y": conditions["vector"]}
    return conditions["crossattn"]
