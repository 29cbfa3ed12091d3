"""Image tensors <-> uint8 arrays and grids, with numpy and Pillow only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.utils.files import atomic_write


def save_image(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """``image.save(path)`` atomically, in the format the suffix names (``.png``, ``.jpg``, ...). ``text``:
    PNG text chunks (e.g. AUTOMATIC1111's ``parameters``, which image viewers and the webui's PNG Info
    read)."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}; use .png or .jpg")
    options = {}
    if text:
        if image_format != "PNG":
            raise ValueError(f"{path}: text chunks need a .png file")
        from PIL.PngImagePlugin import PngInfo

        options["pnginfo"] = info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value) if value.isascii() else info.add_itxt(key, value)
    return atomic_write(path, lambda tmp: image.save(tmp, format=image_format, **options))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> one uint8 [H', W', 3] grid, ``nrow`` images per row."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    img = Image.fromarray(make_grid(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return save_image(img, path)


def save_labelled_grid(
    images: torch.Tensor, labels: list[str], path: str | Path, ncol: int = 4, cell: int = 128
) -> Path:
    """Each image upscaled to ``cell`` px with its label (e.g. the prompt) underneath; Pillow's default
    font."""
    from PIL import ImageDraw

    arr = to_uint8(images)
    text_h = 26
    rows = math.ceil(len(arr) / ncol)
    canvas = Image.new("RGB", (ncol * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(arr, labels)):
        r, c = divmod(i, ncol)
        x, y = 8 + c * (cell + 8), 8 + r * (cell + text_h + 8)
        canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        words, lines = label.split(), [""]
        for word in words:  # wrap to the cell width (~6 px per character)
            if len(lines[-1]) + len(word) + 1 > cell // 6:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((x, y + cell + 1), "\n".join(lines[:2]), fill=(0, 0, 0), spacing=1)
    return save_image(canvas, path)
