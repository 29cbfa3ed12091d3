"""Read a shapes image back (foreground colour, shape, background colour) and score prompts.

Reading, robust to the blur and noise of a generative model:

1. background colour = per-channel median of the border pixels -> nearest palette colour;
2. foreground colour = median of the pixels farthest from the background (the shape's
   interior) -> nearest palette colour; nothing far enough from the background -> None;
3. soft foreground alpha = projection of each pixel onto the background->foreground colour
   segment, softly thresholded around 1/2 (which removes noise but keeps edge positions);
4. shape = for each candidate, fit its box to the alpha's first and second moments (centroid
   and standard deviation of the shape within its own box are known), render the template
   there and take the candidate with the best soft IoU.

A DreamBooth subject (:class:`datamodules.shapes.Subject`, a shape split in two colour halves) is read with
:meth:`ShapesEvaluator.read_halves`: the foreground is every pixel nearer to another palette colour than to
the background, its median splits it in two sides (left/right or top/bottom), each side's median colour is
read separately, and the shape is classified on the whole foreground. An ordinary single-coloured shape reads
the same colour twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from PIL import Image

from datamodules.shapes import COLORS, SHAPES, Layout, Subject, parse_caption, shape_alpha

__all__ = ["ShapesEvaluator", "to_uint8_hwc"]

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)


def to_uint8_hwc(image) -> np.ndarray:
    """Tensor [3, H, W] in [-1, 1], numpy uint8 [H, W, 3] (or float in [0, 1]), or PIL -> float32
    [H, W, 3] on the 0-255 scale."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().to("cpu", torch.float32)
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"expected a tensor [3, H, W] in [-1, 1], got shape {tuple(tensor.shape)}")
        return ((tensor.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an array [H, W, 3], got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    return np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0


def _nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _soft_threshold(alpha: np.ndarray) -> np.ndarray:
    """0.25 -> 0, 0.75 -> 1, linear between: removes noise, keeps the 1/2 contour in place."""
    return np.clip((alpha - 0.25) / 0.5, 0.0, 1.0)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with edge padding."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, radius, mode="edge")
    rows = sum(w * padded[:, k : k + image.shape[1]] for k, w in enumerate(taps))
    return sum(w * rows[k : k + image.shape[0]] for k, w in enumerate(taps)).astype(np.float32)


def _moments(alpha: np.ndarray) -> tuple[float, float, float, float] | None:
    """(mean_x, mean_y, std_x, std_y) of a weight map in pixel coordinates, None if empty."""
    mass = float(alpha.sum())
    if mass <= 1e-6:
        return None
    xs, ys = np.arange(alpha.shape[1]) + 0.5, np.arange(alpha.shape[0]) + 0.5
    col, row = alpha.sum(0), alpha.sum(1)
    mean_x, mean_y = (col * xs).sum() / mass, (row * ys).sum() / mass
    std_x = np.sqrt((col * (xs - mean_x) ** 2).sum() / mass)
    std_y = np.sqrt((row * (ys - mean_y) ** 2).sum() / mass)
    return float(mean_x), float(mean_y), float(max(std_x, 1e-3)), float(max(std_y, 1e-3))


def _blurred_template(shape: str, size: tuple[int, int], layout: Layout, sigma: float) -> np.ndarray:
    return _soft_threshold(_gaussian_blur(shape_alpha(shape, size, layout, supersample=2), sigma))


@cache
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(mean_u, mean_v, std_u, std_v) of the shape's area inside its unit box."""
    n = 256
    alpha = shape_alpha(shape, n, Layout(0, 0, n, n)).astype(np.float64)
    coords = (np.arange(n) + 0.5) / n
    mass = alpha.sum()
    mean_u = (alpha.sum(0) * coords).sum() / mass
    mean_v = (alpha.sum(1) * coords).sum() / mass
    std_u = np.sqrt((alpha.sum(0) * (coords - mean_u) ** 2).sum() / mass)
    std_v = np.sqrt((alpha.sum(1) * (coords - mean_v) ** 2).sum() / mass)
    return float(mean_u), float(mean_v), float(std_u), float(std_v)


class ShapesEvaluator:
    """Reads shapes images and scores them against their captions.

    Args:
        min_contrast: minimal RGB distance (0-255 scale) between the shape's interior and the
            background for a foreground to count as present.
        min_area: minimal foreground area, as a fraction of the image, for a shape to be read.
    """

    def __init__(
        self,
        min_contrast: float = 40.0,
        min_area: float = 0.01,
        template_blurs: Sequence[float] = (1.0, 2.0),
        fit_iterations: int = 2,
        sharp_iou: float = 0.9,
    ):
        self.min_contrast = float(min_contrast)
        self.min_area = float(min_area)
        self.template_blurs = tuple(float(b) for b in template_blurs)
        self.fit_iterations = int(fit_iterations)
        self.sharp_iou = float(sharp_iou)

    # ---------------------------------------------------------------------------------------
    def read(self, image) -> dict[str, str | None]:
        """-> {"color", "shape", "background"}; colour and shape are None when no foreground."""
        x = to_uint8_hwc(image)
        height, width = x.shape[:2]
        bg_rgb = self._border_median(x)
        result: dict[str, str | None] = {"color": None, "shape": None, "background": _nearest_color(bg_rgb)}

        distance = np.linalg.norm(x - bg_rgb, axis=-1)
        peak = float(np.percentile(distance, 99.5))
        if peak < self.min_contrast:
            return result
        interior = distance > 0.7 * peak
        fg_rgb = np.median(x[interior], axis=0)
        direction = fg_rgb - bg_rgb
        contrast = float(np.linalg.norm(direction))
        if contrast < self.min_contrast:
            return result

        # Soft alpha in [0, 1]; the soft threshold (0.25 -> 0, 0.75 -> 1) keeps the 1/2 contour.
        alpha = _soft_threshold(((x - bg_rgb) @ direction) / contrast**2)
        if alpha.sum() < self.min_area * height * width:
            return result
        result["color"] = _nearest_color(fg_rgb)
        result["shape"] = self._classify_shape(alpha)
        return result

    def _classify_shape(self, alpha: np.ndarray) -> str:
        # Work on a crop around the foreground, with room for blurred template tails.
        scale = min(alpha.shape) / 32
        pad = int(np.ceil(3 * max(self.template_blurs, default=0.0) * scale)) + 2
        rows, cols = np.nonzero(alpha > 0)
        r0, r1 = max(rows.min() - pad, 0), min(rows.max() + 1 + pad, alpha.shape[0])
        c0, c1 = max(cols.min() - pad, 0), min(cols.max() + 1 + pad, alpha.shape[1])
        alpha = alpha[r0:r1, c0:c1]
        observed = _moments(alpha)

        # Sharp templates first: enough for clean images and mild blur.
        scores = {shape: self._fit(alpha, observed, shape, 0.0) for shape in SHAPES}
        best = max(scores, key=scores.get)
        if scores[best] >= self.sharp_iou:
            return best
        # Blurrier images: also try templates blurred like the image, keep the best match.
        for sigma in (b * scale for b in self.template_blurs if b > 0):
            for shape in SHAPES:
                scores[shape] = max(scores[shape], self._fit(alpha, observed, shape, sigma))
        return max(scores, key=scores.get)

    def _fit(self, alpha: np.ndarray, observed: tuple, shape: str, sigma: float) -> float:
        """Soft IoU of ``alpha`` with ``shape`` placed by moment matching (template blurred by
        ``sigma`` pixels and soft-thresholded like the image when ``sigma > 0``)."""
        size = alpha.shape
        mu, mv, su, sv = _unit_moments(shape)
        box_w, box_h = observed[2] / su, observed[3] / sv
        layout = Layout(observed[0] - mu * box_w, observed[1] - mv * box_h, box_w, box_h)
        if sigma > 0:
            # Blur widens and rounds the template: rescale and shift its box until the blurred
            # template's centroid and spread match the observed ones.
            for _ in range(self.fit_iterations):
                fitted = _moments(_blurred_template(shape, size, layout, sigma))
                if fitted is None:
                    break
                box_w = layout.width * observed[2] / fitted[2]
                box_h = layout.height * observed[3] / fitted[3]
                rel_x = (fitted[0] - layout.x0) / layout.width
                rel_y = (fitted[1] - layout.y0) / layout.height
                layout = Layout(observed[0] - rel_x * box_w, observed[1] - rel_y * box_h, box_w, box_h)
            template = _blurred_template(shape, size, layout, sigma)
        else:
            template = shape_alpha(shape, size, layout)
        return float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6))

    def read_halves(self, image, split: str = "vertical") -> dict[str, str | None]:
        """-> {"first", "second", "shape", "background"}: the colours of the foreground's two sides (left and
        right for ``split="vertical"``, top and bottom for "horizontal"); None when there is no foreground."""
        x = to_uint8_hwc(image)
        height, width = x.shape[:2]
        bg_rgb = self._border_median(x)
        result: dict[str, str | None] = {
            "first": None,
            "second": None,
            "shape": None,
            "background": _nearest_color(bg_rgb),
        }
        # foreground: pixels nearer to another palette colour than to the background (works for a side
        # whose colour is close to the background, where a contrast threshold would drop it)
        distance = np.linalg.norm(x - bg_rgb, axis=-1)
        others = _PALETTE[[name != result["background"] for name in _PALETTE_NAMES]]
        nearest_other = np.linalg.norm(x[..., None, :] - others, axis=-1).min(axis=-1)
        mask = (distance > nearest_other) & (distance > self.min_contrast)
        if mask.sum() < self.min_area * height * width:
            return result
        rows, cols = np.nonzero(mask)
        coords = cols if split == "vertical" else rows
        centre = float(np.median(coords))
        band = max(1.0, min(height, width) / 32)  # skip the pixels at the split line (a blend of both sides)
        sides = [mask.copy(), mask.copy()]
        sides[0][rows[coords >= centre - band], cols[coords >= centre - band]] = False
        sides[1][rows[coords <= centre + band], cols[coords <= centre + band]] = False
        if min(side.sum() for side in sides) < 0.25 * self.min_area * height * width:
            return result
        result["first"], result["second"] = (self._interior_color(x, distance, side) for side in sides)
        result["shape"] = self._classify_shape(mask.astype(np.float32))
        return result

    def is_subject(self, image, subject: Subject) -> bool:
        """True when ``image`` shows ``subject``: its shape, with its two colours on the right sides."""
        found = self.read_halves(image, subject.split)
        return (found["first"], found["second"], found["shape"]) == (*subject.colors, subject.shape)

    def subject_rate(self, images, subject: Subject) -> float:
        """Fraction of ``images`` (tensor [B, 3, H, W] in [-1, 1] or a sequence) read as ``subject``."""
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images[None]
        hits = [self.is_subject(image, subject) for image in images]
        return float(np.mean(hits)) if hits else 0.0

    @staticmethod
    def _interior_color(x: np.ndarray, distance: np.ndarray, side: np.ndarray) -> str:
        """Palette colour of a side's interior: its pixels farthest from the background (blurred edges
        mix)."""
        far = side & (distance >= np.median(distance[side]))
        return _nearest_color(np.median(x[far], axis=0))

    @staticmethod
    def _border_median(x: np.ndarray) -> np.ndarray:
        border = max(1, round(min(x.shape[:2]) / 32))
        edge = np.concatenate(
            [
                x[:border].reshape(-1, 3),
                x[-border:].reshape(-1, 3),
                x[:, :border].reshape(-1, 3),
                x[:, -border:].reshape(-1, 3),
            ]
        )
        return np.median(edge, axis=0)

    def read_batch(self, images) -> list[dict[str, str | None]]:
        """``images``: tensor [B, 3, H, W] in [-1, 1] or a sequence of anything :meth:`read` takes."""
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images[None]
        return [self.read(image) for image in images]

    # ---------------------------------------------------------------------------------------
    def score(self, images, captions: Sequence[str]) -> dict[str, float]:
        """Fraction of images whose foreground colour AND shape match their caption ("fidelity"),
        per-attribute accuracies, ``all_acc`` (colour, shape and background right) and ``n``.

        A caption that is not a shapes caption raises ``ValueError``.
        """
        reads = self.read_batch(images)
        if len(reads) != len(captions):
            raise ValueError(f"{len(reads)} images but {len(captions)} captions")
        n = len(reads)
        if n == 0:
            return {
                "fidelity": 0.0,
                "color_acc": 0.0,
                "shape_acc": 0.0,
                "background_acc": 0.0,
                "all_acc": 0.0,
                "n": 0,
            }
        hits = np.zeros((n, 3), dtype=bool)
        for k, (found, caption) in enumerate(zip(reads, captions)):
            target = parse_caption(caption)
            if target is None:
                raise ValueError(f"not a shapes caption: {caption!r}")
            hits[k] = [
                found["color"] == target[0],
                found["shape"] == target[1],
                found["background"] == target[2],
            ]
        return {
            "fidelity": float((hits[:, 0] & hits[:, 1]).mean()),
            "color_acc": float(hits[:, 0].mean()),
            "shape_acc": float(hits[:, 1].mean()),
            "background_acc": float(hits[:, 2].mean()),
            "all_acc": float(hits.all(axis=1).mean()),
            "n": n,
        }
