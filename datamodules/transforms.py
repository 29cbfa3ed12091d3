"""Image loading and preprocessing shared by the datamodules (Pillow + numpy, no torchvision).

``load_rgb`` turns any file Pillow reads into an 8-bit RGB image the right way up: EXIF
orientation applied, transparency composited on a background colour, 16-bit and 32-bit
greyscale scaled to 8 bits, palette / CMYK / bilevel converted. ``resize_shorter_side``,
``crop`` and ``to_tensor`` do the rest of the usual training transform.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from datamodules.buckets import cover_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "center_crop_box",
    "crop_box",
    "image_size",
    "load_rgb",
    "preprocess",
    "preprocess_to_size",
    "random_crop_box",
    "resize_shorter_side",
    "size_conditions",
    "to_rgb",
    "to_tensor",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float greyscale -> 8-bit "L".

    ``I;16*`` spans 0..65535 and is divided by 257. ``I`` (how Pillow opens many 16-bit PNGs and
    TIFFs) is treated as 16-bit when any value exceeds 255, else as 8-bit. ``F`` is treated as
    [0, 1] when its maximum is at most 1, else as 0..255.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    elif image.mode == "I":
        if values.size and values.max() > 255:
            values = np.clip(values, 0, 65535) / 257.0
    elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    values = np.nan_to_num(values, nan=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> "RGB". Transparency (RGBA, LA, PA, P or L/RGB with a ``transparency``
    entry) is alpha-composited over ``background``."""
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    # L, P, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions (CMYK -> RGB is the naive inverse).
    return image.convert("RGB")


def load_rgb(
    path_or_image,
    background: tuple[int, int, int] = (255, 255, 255),
    min_side: int | None = None,
) -> Image.Image:
    """Open (a path) or take (a PIL image), apply EXIF orientation, convert to 8-bit RGB.

    ``min_side``: the shorter side the caller will shrink to; a JPEG at least twice that size is
    decoded at a reduced scale (Pillow ``draft``, never below ``min_side``), which is much faster.
    """
    if isinstance(path_or_image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(path_or_image), background)
    with Image.open(path_or_image) as opened:
        if min_side is not None and opened.format == "JPEG" and opened.mode in ("RGB", "L"):
            width, height = opened.size
            scale = min_side / min(width, height)
            if scale <= 0.5:
                opened.draft(opened.mode, (int(np.ceil(width * scale)), int(np.ceil(height * scale))))
        image = ImageOps.exif_transpose(opened)  # loads the pixels; always returns a new image
    return to_rgb(image, background)


def resize_shorter_side(image: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Scale so that the shorter side equals ``size`` (aspect ratio kept)."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=resample, reducing_gap=3.0)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


def random_crop_box(width: int, height: int, size: int, generator: torch.Generator | None = None):
    """A uniformly random ``size`` x ``size`` box; uses torch's RNG (seeded per worker by Lightning)."""
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    return left, top, left + size, top + size


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def size_conditions(
    original: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int], flipped: bool
) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning of one training image, under sgm's batch keys (long tensors ``[2]``):
    ``original_size_as_tuple`` (H, W of the image as loaded, before resizing), ``crop_coords_top_left`` (top,
    left of the crop ``box`` in the ``resized`` (w, h) image) and ``target_size_as_tuple`` (H, W of the crop).
    A flipped image's crop is mirrored: its left is ``resized width - box right`` (kohya's rule: the offset of
    the crop in the image the model saw; diffusers' SDXL script writes ``crop width - left`` instead)."""
    left, top, right, bottom = box
    return {
        "original_size_as_tuple": torch.tensor([original[1], original[0]]),
        "crop_coords_top_left": torch.tensor([top, resized[0] - right if flipped else left]),
        "target_size_as_tuple": torch.tensor([bottom - top, right - left]),
    }


def _crop_and_flip(image: Image.Image, box, flip_probability: float, generator, original, with_sizes: bool):
    resized = image.size
    if box != (0, 0, *resized):
        image = image.crop(box)
    flipped = flip_probability > 0 and float(torch.rand((), generator=generator)) < flip_probability
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if not with_sizes:
        return to_tensor(image)
    return to_tensor(image), size_conditions(original, resized, box, flipped)


def preprocess(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    flip_probability: float = 0.0,
    generator: torch.Generator | None = None,
    original_size: tuple[int, int] | None = None,
    with_sizes: bool = False,
):
    """RGB image -> resize shorter side -> square crop -> optional horizontal flip -> [3, R, R]; with
    ``with_sizes``, (that, its ``size_conditions``), ``original_size`` (w, h) defaulting to ``image.size``
    (give the file's size when the image was decoded at a reduced scale)."""
    original = original_size or image.size
    image = resize_shorter_side(image, resolution)
    width, height = image.size
    if center_crop:
        box = center_crop_box(width, height, resolution)
    else:
        box = random_crop_box(width, height, resolution, generator)
    return _crop_and_flip(image, box, flip_probability, generator, original, with_sizes)


def image_size(path) -> tuple[int, int]:
    """(width, height) as ``load_rgb`` will return it (EXIF rotations applied), from the header only."""
    with Image.open(path) as opened:
        width, height = opened.size
        # a PNG's getexif() would decode the whole file to look for a late eXIf chunk: use an early one only
        header_only = opened.format != "PNG" or "exif" in opened.info
        orientation = opened.getexif().get(0x0112, 1) if header_only else 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def crop_box(
    width: int,
    height: int,
    target: tuple[int, int],
    center: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A ``target`` = (w, h) box inside a width x height image: centred, or uniformly random."""
    target_w, target_h = target
    if center:
        left, top = (width - target_w) // 2, (height - target_h) // 2
    else:
        left = int(torch.randint(0, width - target_w + 1, (), generator=generator))
        top = int(torch.randint(0, height - target_h + 1, (), generator=generator))
    return left, top, left + target_w, top + target_h


def preprocess_to_size(
    image: Image.Image,
    target: tuple[int, int],
    center_crop: bool = True,
    flip_probability: float = 0.0,
    generator: torch.Generator | None = None,
    original_size: tuple[int, int] | None = None,
    with_sizes: bool = False,
):
    """RGB image -> resized to cover ``target`` = (w, h) (aspect kept, Lanczos) -> crop of the excess
    (one axis only) -> optional horizontal flip -> [3, h, w]; ``with_sizes``/``original_size``: as
    ``preprocess``."""
    original = original_size or image.size
    size = cover_size(*image.size, target)
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.LANCZOS, reducing_gap=3.0)
    box = crop_box(size[0], size[1], target, center_crop, generator)
    return _crop_and_flip(image, box, flip_probability, generator, original, with_sizes)
