"""SDXL's size conditions at sampling time, and the UNet input from the conditioner's output.

Training batches carry each image's ``original_size_as_tuple`` (H, W before resizing),
``crop_coords_top_left`` (top, left of the crop in the resized image) and ``target_size_as_tuple`` (H, W of
the training image); see ``datamodules/transforms.py``. Sampling has no data, so ``sampling_batch`` fills
them: by default original = target = the output size and crop (0, 0) (what SDXL's pipeline does), each
settable (``sample.py
--original-size H W --crop-top-left T L --target-size H W``, ``model.log_sizes`` for logged grids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["SIZE_KEYS", "sampling_batch", "unet_condition"]

# option name (sample.py / model.log_sizes) -> the batch key the size embedder reads (sgm's names)
SIZE_KEYS = {
    "original_size": "original_size_as_tuple",
    "crop_top_left": "crop_coords_top_left",
    "target_size": "target_size_as_tuple",
}


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
    default (original = target = ``output_size`` (H, W), crop (0, 0))."""
    sizes = {k: v for k, v in (sizes or {}).items() if v is not None}
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise ValueError(f"unknown size option(s) {unknown}; expected some of {sorted(SIZE_KEYS)}")
    defaults = {"original_size": output_size, "crop_top_left": (0, 0), "target_size": output_size}
    batch: dict[str, Any] = {"caption": list(prompts)}
    for name, key in SIZE_KEYS.items():
        if key in input_keys:
            pair = _pair(name, sizes.get(name, defaults[name]))
            batch[key] = torch.tensor([pair] * len(prompts), device=device)
    return batch


def unet_condition(conditions: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The UNet's condition: the context alone (SD 1.x / 2.x), or ``{"context", "y"}`` with a vector
    (SDXL)."""
    if "vector" in conditions:
        return {"context": conditions["crossattn"], "y": conditions["vector"]}
    return conditions["crossattn"]
