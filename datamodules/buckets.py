"""Aspect-ratio buckets (the NovelAI scheme that kohya sd-scripts popularised).

A bucket is an image size (width, height) with sides multiples of ``step`` (64 for SD's f=8 VAE: the
VAE factor x 8, so that latent sides stay divisible by the UNet's downsampling), an area of at most
``resolution``^2, and sides within [min_side, max_side]. Each image goes to the bucket whose aspect
ratio is nearest its own (compared as log(width / height), so 2:1 and 1:2 are equally far from 1:1),
and is resized to *cover* the bucket (both sides at least the bucket's) with the smallest crop: only
the excess along one axis is cut, never more than the aspect-ratio mismatch requires.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "assign_buckets",
    "bucket_summary",
    "cover_size",
    "default_bucket_step",
    "make_buckets",
    "nearest_bucket",
]

Size = tuple[int, int]  # (width, height)


def default_bucket_step(resolution: int) -> int:
    """64 (SD: VAE factor 8 x 8) from 256 px up; resolution / 4 below (small test and demo images)."""
    return 64 if resolution >= 256 else max(1, int(resolution) // 4)


def make_buckets(
    resolution: int, step: int | None = 64, min_side: int | None = None, max_side: int | None = None
) -> list[Size]:
    """Bucket sizes of about ``resolution``^2 pixels, sorted by aspect ratio (widest last).

    For every width w in [min_side, max_side] (multiples of ``step``), the tallest height that
    keeps w * h <= resolution^2 (also a multiple of ``step``, within the limits), and its transpose.
    Defaults: min_side = resolution / 2, max_side = 2 * resolution (kohya uses 256..1024 at 512).
    """
    resolution = int(resolution)
    step = default_bucket_step(resolution) if step is None else int(step)
    if step <= 0 or resolution < step:
        raise ValueError(f"need 0 < bucket step <= resolution, got step={step}, resolution={resolution}")
    min_side = int(min_side) if min_side else max(step, resolution // 2)
    max_side = int(max_side) if max_side else 2 * resolution
    min_side = max(step, -(-min_side // step) * step)  # round up to a multiple of step
    max_side = max_side // step * step
    if min_side > resolution or max_side < resolution // step * step:
        raise ValueError(
            f"bucket side limits [{min_side}, {max_side}] must include the square side "
            f"{resolution // step * step}; adjust min_side/max_side (data.bucket_min_side/bucket_max_side)"
        )
    area = resolution * resolution
    square = math.isqrt(area) // step * step
    buckets = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height < min_side:
            break
        buckets.add((width, height))
        buckets.add((height, width))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> int:
    """Index of the bucket nearest in log aspect ratio (ties: the larger bucket)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda k: (abs(ratio - math.log(buckets[k][0] / buckets[k][1])), -buckets[k][0] * buckets[k][1]),
    )


def assign_buckets(sizes: Sequence[Size], buckets: Sequence[Size]) -> list[int]:
    """Bucket index of every image size; images with the same ratio share one lookup."""
    cache: dict[tuple[int, int], int] = {}
    out = []
    for width, height in sizes:
        g = math.gcd(int(width), int(height)) or 1
        key = (int(width) // g, int(height) // g)
        if key not in cache:
            cache[key] = nearest_bucket(int(width), int(height), buckets)
        out.append(cache[key])
    return out


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size to resize (width, height) to so that it covers ``bucket`` with the smallest crop:
    one side equals the bucket's, the other is at least the bucket's (aspect ratio kept)."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def bucket_summary(buckets: Sequence[Size], bucket_ids: Sequence[int]) -> str:
    """One line per used bucket: "512x768 (ratio 0.67): 12 images"; plus the unused count."""
    counts = Counter(bucket_ids)
    lines = [f"{len(counts)} of {len(buckets)} buckets used by {len(bucket_ids)} images"]
    for k in sorted(counts, key=lambda k: buckets[k][0] / buckets[k][1]):
        w, h = buckets[k]
        lines.append(f"  {w}x{h} (ratio {w / h:.2f}): {counts[k]} image(s)")
    return "\n".join(lines)
