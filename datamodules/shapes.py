"""The embedded procedural dataset: one coloured shape on a plain coloured background.

Every image is computed on the fly from ``np.random.default_rng([seed, split, stream, i])``,
so item ``i`` is always the same picture, nothing is downloaded, and workers need no state.
Captions read "a red circle on a blue background" ("an" before vowels: "an orange star").

Two hold-out mechanisms give later stages something measurable to do:

* ``holdout_concepts`` (words such as ``"star"`` or ``"purple"``): every combination that uses a
  held-out word as foreground colour, shape or background is kept out of ``train``/``val``; the
  ``concept`` split holds exactly those combinations (the fine-tuning data).
* ``heldout_combo_fraction``: a seeded subset of the remaining (colour, shape, background)
  combinations never appears in training; the ``heldout`` split yields only those, so prompt
  fidelity can be measured on prompts the model has never seen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.resumable import resumable_loader
from ldm.utils.data_handover import DataFacts

__all__ = [
    "COLORS",
    "SHAPES",
    "SPLITS",
    "Layout",
    "ShapesDataModule",
    "ShapesDataset",
    "Subject",
    "all_combos",
    "caption_for",
    "parse_caption",
    "render",
    "render_subject",
    "sample_layout",
    "shape_alpha",
    "split_combos",
]

# Saturated, far-apart colours (min pairwise RGB distance ~90) so they survive a blurry decoder.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 30),
    "green": (30, 175, 45),
    "blue": (35, 65, 225),
    "yellow": (245, 225, 30),
    "orange": (245, 135, 20),
    "purple": (125, 40, 175),
    "cyan": (35, 215, 230),
    "magenta": (235, 45, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SPLITS: tuple[str, ...] = ("train", "val", "heldout", "concept")
_SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}

SUPERSAMPLE = 4  # 4x4 samples per pixel, box-filtered: clean anti-aliased edges
MIN_RESOLUTION = 16
SIZE_RANGE = (0.45, 0.75)  # shape box side as a fraction of the image side
MARGIN = 0.06  # minimum gap between shape box and image border, fraction of the side


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(color: str, shape: str, background: str) -> str:
    """``caption_for("red", "circle", "blue") -> "a red circle on a blue background"``."""
    return f"{_article(color)} {color} {shape} on {_article(background)} {background} background"


_CAPTION_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*\.?\s*$", re.IGNORECASE)


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """Inverse of :func:`caption_for` (accepts "a"/"an" either way); None if not a shapes caption."""
    match = _CAPTION_RE.match(caption)
    if match is None:
        return None
    color, shape, background = (word.lower() for word in match.groups())
    if color not in COLORS or shape not in SHAPES or background not in COLORS:
        return None
    return color, shape, background


# --------------------------------------------------------------------------------------------
# Geometry: every shape is defined inside the unit box [0, 1]^2 and touches all four sides.


def _star_polygon(points: int = 5, inner_ratio: float = 0.47) -> list[tuple[float, float]]:
    verts = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner_ratio
        angle = -math.pi / 2 + k * math.pi / points  # first point straight up
        verts.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*verts)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in verts]


_ARM = 0.34  # cross arm width, fraction of the box
_a, _b = 0.5 - _ARM / 2, 0.5 + _ARM / 2
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "cross": [
        (_a, 0),
        (_b, 0),
        (_b, _a),
        (1, _a),
        (1, _b),
        (_b, _b),
        (_b, 1),
        (_a, 1),
        (_a, _b),
        (0, _b),
        (0, _a),
        (_a, _a),
    ],
    "star": _star_polygon(),
}


@dataclass(frozen=True)
class Layout:
    """Where the shape's box sits, in continuous pixel coordinates (image spans [0, W] x [0, H])."""

    x0: float
    y0: float
    width: float
    height: float


def sample_layout(resolution: int, rng: np.random.Generator) -> Layout:
    """Box side 45-75% of the image, jittered so it stays at least ``MARGIN`` inside the border."""
    side = rng.uniform(*SIZE_RANGE) * resolution
    margin = MARGIN * resolution
    free = max(resolution - side - 2 * margin, 0.0)
    x0 = margin + rng.uniform(0, free)
    y0 = margin + rng.uniform(0, free)
    return Layout(x0, y0, side, side)


def centered_layout(resolution: int, fraction: float = 0.6) -> Layout:
    side = fraction * resolution
    offset = (resolution - side) / 2
    return Layout(offset, offset, side, side)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean membership of unit-box points (u, v) in ``shape`` (even-odd rule for polygons)."""
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    verts = _POLYGONS[shape]
    for (x1, y1), (x2, y2) in zip(verts, verts[1:] + verts[:1]):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at_v = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at_v)
    return inside


def shape_alpha(
    shape: str, size: int | tuple[int, int], layout: Layout, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Anti-aliased coverage of ``shape`` drawn into ``layout``: float32 [H, W] in [0, 1].

    ``size`` is the image side or ``(height, width)``. Coverage is the fraction of a
    ``supersample`` x ``supersample`` grid of sample points inside the shape (a box filter).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    height, width = (size, size) if isinstance(size, int) else size
    alpha = np.zeros((height, width), dtype=np.float32)
    if layout.width <= 0 or layout.height <= 0:
        return alpha
    # Only the pixels the box touches need sampling.
    c0, c1 = max(math.floor(layout.x0), 0), min(math.ceil(layout.x0 + layout.width), width)
    r0, r1 = max(math.floor(layout.y0), 0), min(math.ceil(layout.y0 + layout.height), height)
    if c0 >= c1 or r0 >= r1:
        return alpha
    s = int(supersample)
    offsets = (np.arange(s) + 0.5) / s
    xs = (np.arange(c0, c1)[:, None] + offsets[None]).ravel()  # sample x in pixel coordinates
    ys = (np.arange(r0, r1)[:, None] + offsets[None]).ravel()
    u = ((xs - layout.x0) / layout.width)[None, :]
    v = ((ys - layout.y0) / layout.height)[:, None]
    inside = _inside(shape, u, v) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    alpha[r0:r1, c0:c1] = inside.reshape(r1 - r0, s, c1 - c0, s).sum(axis=(1, 3), dtype=np.float32) / (s * s)
    return alpha


def _layout_for(resolution: int, rng_or_layout: np.random.Generator | Layout | None) -> Layout:
    """The layout of :func:`render` / :func:`render_subject`: given, centred (None) or drawn from a
    Generator."""
    _check_resolution(resolution)
    if isinstance(rng_or_layout, Layout):
        return rng_or_layout
    if rng_or_layout is None:
        return centered_layout(resolution)
    return sample_layout(resolution, rng_or_layout)


def render(
    color: str,
    shape: str,
    background: str,
    resolution: int,
    rng_or_layout: np.random.Generator | Layout | None = None,
) -> np.ndarray:
    """One image as uint8 [H, W, 3]. ``rng_or_layout``: a Generator (random layout), a
    :class:`Layout`, or None (centred, 60% of the side)."""
    if color not in COLORS or background not in COLORS:
        raise ValueError(f"unknown colour in ({color!r}, {background!r}); expected one of {list(COLORS)}")
    layout = _layout_for(resolution, rng_or_layout)
    alpha = shape_alpha(shape, resolution, layout)[..., None]
    fg = np.asarray(COLORS[color], dtype=np.float32)
    bg = np.asarray(COLORS[background], dtype=np.float32)
    image = bg * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Subject:
    """A DreamBooth-style subject: one particular member of a class the base knows (``shape``), recognisable
    by a pattern no ordinary member has: the shape split in two colour halves, ``colors[0]`` left (or top)
    and ``colors[1]`` right (or bottom), ``split`` "vertical" (left | right) or "horizontal" (top / bottom).
    Ordinary dataset items are single-coloured, so "the subject" and "a yellow square" are told apart.
    The same colour twice is a *solid* subject: an object the base can already draw ("a magenta diamond"),
    for methods that can only name what the model draws (textual inversion, hypernetworks)."""

    shape: str = "square"
    colors: tuple[str, str] = ("yellow", "magenta")
    split: str = "vertical"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"subject shape {self.shape!r} unknown; expected one of {SHAPES}")
        colors = tuple(self.colors)
        if len(colors) != 2 or any(c not in COLORS for c in colors):
            raise ValueError(
                f"subject colors must be two palette colours (the same twice for a solid subject), "
                f"got {self.colors!r}; palette: {list(COLORS)}"
            )
        object.__setattr__(self, "colors", colors)
        if self.split not in ("vertical", "horizontal"):
            raise ValueError(f"subject split must be 'vertical' or 'horizontal', got {self.split!r}")

    @property
    def solid(self) -> bool:
        return self.colors[0] == self.colors[1]

    def backgrounds(self, exclude: Sequence[str] = ()) -> list[str]:
        """Palette colours the subject can stand on (not its own colours), minus ``exclude``."""
        return [c for c in COLORS if c not in self.colors and c not in exclude]


def _first_half_weight(subject: Subject, resolution: int, layout: Layout) -> np.ndarray:
    """Per-pixel fraction [H, W] on the first side (left or top) of the line splitting the layout box."""
    centres = np.arange(resolution, dtype=np.float32)
    if subject.split == "vertical":
        line = layout.x0 + layout.width / 2
        return np.broadcast_to(np.clip(line - centres, 0.0, 1.0)[None, :], (resolution, resolution))
    line = layout.y0 + layout.height / 2
    return np.broadcast_to(np.clip(line - centres, 0.0, 1.0)[:, None], (resolution, resolution))


def render_subject(
    subject: Subject,
    background: str,
    resolution: int,
    rng_or_layout: np.random.Generator | Layout | None = None,
) -> np.ndarray:
    """The subject on ``background`` as uint8 [H, W, 3]; layouts as in :func:`render`."""
    if background not in COLORS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(COLORS)}")
    layout = _layout_for(resolution, rng_or_layout)
    alpha = shape_alpha(subject.shape, resolution, layout)[..., None]
    first = _first_half_weight(subject, resolution, layout)[..., None]
    first_rgb, second_rgb = (np.asarray(COLORS[c], dtype=np.float32) for c in subject.colors)
    fg = first * first_rgb + (1.0 - first) * second_rgb
    image = np.asarray(COLORS[background], dtype=np.float32) * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION or resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 and >= {MIN_RESOLUTION}, got {resolution!r}")


# --------------------------------------------------------------------------------------------
# Combinations and splits


def all_combos() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with background != colour, in a fixed order."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def _validate_concepts(holdout_concepts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(holdout_concepts, str):
        holdout_concepts = [holdout_concepts]
    concepts = tuple(str(word).lower() for word in (holdout_concepts or ()))
    vocab = set(COLORS) | set(SHAPES)
    unknown = [w for w in concepts if w not in vocab]
    if unknown:
        raise ValueError(f"unknown holdout concept(s) {unknown}; choose from {sorted(vocab)}")
    return concepts


@lru_cache(maxsize=64)
def _split_table(
    seed: int, holdout_concepts: tuple[str, ...], heldout_combo_fraction: float
) -> dict[str, tuple[tuple[str, str, str], ...]]:
    combos = all_combos()
    concept = [c for c in combos if set(c) & set(holdout_concepts)]
    rest = [c for c in combos if not set(c) & set(holdout_concepts)]
    # The held-out subset depends on the seed only (not on the item index): walk one seeded
    # permutation of all combos and keep the first non-concept ones.
    order = np.random.default_rng([seed, 7919]).permutation(len(combos))
    n_heldout = round(heldout_combo_fraction * len(rest))
    rest_set = set(rest)
    heldout = [combos[k] for k in order if combos[k] in rest_set][:n_heldout]
    heldout_set = set(heldout)
    train = [c for c in rest if c not in heldout_set]

    def shuffled(items: list) -> tuple:
        perm = np.random.default_rng([seed, 104729, len(items)]).permutation(len(items))
        return tuple(items[k] for k in perm)

    # Items cycle through a split's combos, so a shuffled order keeps any prefix balanced.
    return {
        "train": shuffled(train),
        "val": shuffled(train),
        "heldout": shuffled(heldout),
        "concept": shuffled(concept),
    }


def split_combos(
    split: str,
    seed: int = 0,
    holdout_concepts: Sequence[str] = ("star",),
    heldout_combo_fraction: float = 0.1,
) -> list[tuple[str, str, str]]:
    """The (colour, shape, background) combinations a split uses, in its item order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 <= heldout_combo_fraction < 1.0:
        raise ValueError(f"heldout_combo_fraction must be in [0, 1), got {heldout_combo_fraction}")
    table = _split_table(int(seed), _validate_concepts(holdout_concepts), float(heldout_combo_fraction))
    return list(table[split])


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ShapesDataset(Dataset):
    """Captioned shapes; item ``i`` -> {"image": [3, H, W] in [-1, 1], "caption", "color",
    "shape", "background"}. Items cycle through ``self.combos``; layout comes from
    ``default_rng([seed, split, stream, i])`` so splits never share an item seed.

    ``size_conditions``: items also carry SDXL's micro-conditioning (``[2]`` long tensors under sgm's keys).
    Rendered at the target size: original = target = (R, R), crop (0, 0); with ``random_crop_margin`` m
    (a multiple of 8) an item is rendered at R + m and a random R x R window of it is taken (the draw after
    the layout's), so original = (R + m, R + m) and the crop offset is the window's (top, left).
    ``uncropped_fraction`` f of the items (drawn per item, apart from the layout) are rendered at R and kept
    whole even then (original = target, crop (0, 0)), as real data mixes resized and cropped images: the
    model sees what "uncropped" means, which sampling's defaults ask for."""

    def __init__(
        self,
        size: int = 2000,
        resolution: int = 32,
        seed: int = 0,
        split: str = "train",
        holdout_concepts: Sequence[str] = ("star",),
        heldout_combo_fraction: float = 0.1,
        stream: int = 0,
        size_conditions: bool = False,
        random_crop_margin: int = 0,
        uncropped_fraction: float = 0.0,
    ):
        _check_resolution(resolution)
        if random_crop_margin < 0 or random_crop_margin % 8:
            raise ValueError(f"random_crop_margin must be a multiple of 8 >= 0, got {random_crop_margin}")
        if not 0.0 <= uncropped_fraction <= 1.0:
            raise ValueError(f"uncropped_fraction must be in [0, 1], got {uncropped_fraction}")
        self.size_conditions = bool(size_conditions)
        self.random_crop_margin = int(random_crop_margin)
        self.uncropped_fraction = float(uncropped_fraction) if random_crop_margin else 0.0
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = int(size)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.split = split
        self.stream = int(stream)
        self.holdout_concepts = _validate_concepts(holdout_concepts)
        self.heldout_combo_fraction = float(heldout_combo_fraction)
        self.combos = split_combos(split, seed, self.holdout_concepts, heldout_combo_fraction)
        if not self.combos and self.size:
            raise ValueError(
                f"split {split!r} has no combinations (holdout_concepts={list(self.holdout_concepts)}, "
                f"heldout_combo_fraction={heldout_combo_fraction})"
            )

    def __len__(self) -> int:
        return self.size

    def fingerprint(self, check: str = "stat") -> str:
        """Everything the items depend on (for latent caches): they are computed from these settings (no
        files, so ``check`` changes nothing)."""
        return repr(
            (
                "shapes-v1",
                self.size,
                self.resolution,
                self.seed,
                self.split,
                self.stream,
                self.holdout_concepts,
                self.heldout_combo_fraction,
                SUPERSAMPLE,
                SIZE_RANGE,
                MARGIN,
            )
            + ((self.random_crop_margin,) if self.random_crop_margin else ())
            + (("uncropped", self.uncropped_fraction) if self.uncropped_fraction else ())
        )

    def item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], self.stream, index])

    def cropped(self, index: int) -> bool:
        """Whether item ``index`` is a random window of a larger render (its own draw, not the layout's)."""
        if not self.random_crop_margin:
            return False
        draw = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], self.stream, index, 1]).random()
        return bool(draw >= self.uncropped_fraction)

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        index %= self.size
        color, shape, background = self.combos[index % len(self.combos)]
        cropped = self.cropped(index)
        rng, top, left = self.item_rng(index), 0, 0
        side = self.resolution + (self.random_crop_margin if cropped else 0)
        image = render(color, shape, background, side, rng)
        if cropped:
            top, left = (int(v) for v in rng.integers(0, self.random_crop_margin + 1, size=2))
            image = np.ascontiguousarray(image[top : top + self.resolution, left : left + self.resolution])
        item = {
            "image": _to_tensor(image),
            "caption": caption_for(color, shape, background),
            "color": color,
            "shape": shape,
            "background": background,
        }
        if self.size_conditions:
            item.update(
                {
                    "original_size_as_tuple": torch.tensor([side, side]),
                    "crop_coords_top_left": torch.tensor([top, left]),
                    "target_size_as_tuple": torch.tensor([self.resolution, self.resolution]),
                }
            )
        return item


class ShapesDataModule(L.LightningDataModule):
    """Train on ``train_split`` ("train", or "concept" for fine-tuning on the held-out concepts),
    validate on unseen items of the same combinations, test on the ``heldout`` combinations."""

    def __init__(
        self,
        resolution: int = 32,
        batch_size: int = 32,
        train_size: int = 4000,
        val_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        holdout_concepts: Sequence[str] = ("star",),
        heldout_combo_fraction: float = 0.1,
        train_split: str = "train",
        pin_memory: bool = False,
        size_conditions: bool = False,
        random_crop_margin: int = 0,
        uncropped_fraction: float = 0.0,
    ):
        super().__init__()
        if train_split not in ("train", "concept"):
            raise ValueError(f"train_split must be 'train' or 'concept', got {train_split!r}")
        _check_resolution(resolution)
        self.save_hyperparameters()
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.holdout_concepts = _validate_concepts(holdout_concepts)
        self.heldout_combo_fraction = heldout_combo_fraction
        self.train_split = train_split
        self.data_train: ShapesDataset | None = None
        self.data_val: ShapesDataset | None = None
        self.data_test: ShapesDataset | None = None

    def _dataset(self, split: str, size: int, stream: int = 0) -> ShapesDataset:
        return ShapesDataset(
            size,
            self.resolution,
            self.seed,
            split,
            self.holdout_concepts,
            self.heldout_combo_fraction,
            stream=stream,
            size_conditions=self.hparams.size_conditions,
            random_crop_margin=self.hparams.random_crop_margin,
            uncropped_fraction=self.hparams.uncropped_fraction,
        )

    def data_facts(self) -> DataFacts:
        """What a model may know of this data (``ldm/utils/data_handover.py``)."""
        return DataFacts(resolution=self.resolution)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.data_train is None:
            self.data_train = self._dataset(self.train_split, hp.train_size)
            # Validation: same combinations as training, item seeds never used by training.
            if self.train_split == "train":
                self.data_val = self._dataset("val", hp.val_size)
            else:
                self.data_val = self._dataset(self.train_split, hp.val_size, stream=1)
            self.data_test = self._dataset("heldout", hp.val_size)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return resumable_loader(
            self.data_train,
            self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_val)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_test)

    def prompts(self, split: str = "heldout", n: int | None = None) -> list[str]:
        """Captions for evaluation: each combination of ``split`` once (seeded order), or the
        first ``n`` of that order, cycling when ``n`` exceeds the number of combinations."""
        combos = split_combos(split, self.seed, self.holdout_concepts, self.heldout_combo_fraction)
        if not combos:
            return []
        n = len(combos) if n is None else int(n)
        return [caption_for(*combos[k % len(combos)]) for k in range(n)]
