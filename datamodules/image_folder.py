"""Users' own captioned images: a folder (searched recursively) -> {"image", "caption"} batches.

Captions, in order of precedence: a sidecar text file with the image's stem (``cat.png`` ->
``cat.txt``; extension configurable), then a ``metadata.jsonl`` in the image's folder or any
folder above it (Hugging Face imagefolder style: one JSON object per line with ``file_name``
relative to that metadata file and ``text``), then ``default_caption``.

Every image is opened and decoded once when the folder is scanned; unreadable files are skipped
with one warning each (logger ``datamodules.image_folder``) and a summary with the count. A
missing folder, or one without any readable image, fails at construction / ``setup()`` with a
message naming the path, before any training starts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.transforms import IMAGE_EXTENSIONS, load_rgb, preprocess

__all__ = [
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ImageRecord",
    "check_image",
    "find_image_files",
    "scan_image_folder",
]

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
_SUMMARY_NAMES = 10  # how many skipped files the summary warning lists by name


@dataclass(frozen=True)
class ImageRecord:
    """One usable image and its caption (None: no caption file, use the default)."""

    path: Path
    caption: str | None = None


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"image folder {str(path)!r} does not exist; create it and put images in it "
            f"({', '.join(IMAGE_EXTENSIONS)}), or point `root` (data.root) at an existing folder"
        )
    if not path.is_dir():
        raise NotADirectoryError(
            f"image folder {str(path)!r} is a file, not a folder; point `root` at its folder"
        )
    return path


def find_image_files(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (recursive, case-insensitive extensions, hidden entries
    ignored), sorted for a reproducible order."""
    root = _check_root(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found)


def check_image(path: str | os.PathLike) -> str | None:
    """Open, verify and decode one image; None if fine, else the reason it is unusable."""
    try:
        with Image.open(path) as image:
            image.verify()  # header and, for PNG, chunk checksums
        with Image.open(path) as image:
            if image.format == "JPEG":  # a reduced-scale decode still reads the whole stream
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            if image.width == 0 or image.height == 0:
                return "image has zero size"
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return None


def _read_metadata(root: Path) -> dict[Path, str]:
    """Captions from every ``metadata.jsonl`` under ``root``; deeper files win on conflicts."""
    captions: dict[Path, str] = {}
    metadata_files = sorted(root.rglob(METADATA_FILE), key=lambda p: len(p.parts))
    for metadata in metadata_files:
        with open(metadata, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    file_name = entry["file_name"]
                    text = entry.get("text", entry.get("caption"))
                except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
                    log.warning("ignoring line %d of %s: %s", line_number, metadata, error)
                    continue
                if text is not None:
                    captions[(metadata.parent / file_name).resolve()] = str(text).strip()
    return captions


def _sidecar_caption(path: Path, caption_ext: str) -> str | None:
    sidecar = path.with_suffix(caption_ext)
    if sidecar.is_file():
        data = sidecar.read_bytes()
        try:
            return data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as error:
            raise ValueError(
                f"caption file {sidecar} is not UTF-8 text (byte 0x{data[error.start]:02x} at position "
                f"{error.start}); re-save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
            ) from None
    return None


def resolve_captions(
    root: str | os.PathLike, paths: Sequence, caption_ext: str = ".txt"
) -> list[ImageRecord]:
    """Attach captions (sidecar, then metadata.jsonl) to image paths under ``root``."""
    metadata = _read_metadata(Path(root))
    records = []
    for path in map(Path, paths):
        caption = _sidecar_caption(path, caption_ext) if caption_ext else None
        if caption is None:
            caption = metadata.get(path.resolve())
        records.append(ImageRecord(path, caption))
    return records


def scan_image_folder(root: str | os.PathLike, caption_ext: str = ".txt") -> list[ImageRecord]:
    """Find, check (once) and caption every image under ``root``.

    Raises FileNotFoundError for a missing folder and ValueError when no image is readable.
    """
    root = _check_root(root)
    paths = find_image_files(root)
    readable, skipped = [], []
    for path in paths:
        reason = check_image(path)
        if reason is None:
            readable.append(path)
        else:
            skipped.append(path)
            log.warning("skipping unreadable image %s (%s)", path, reason)
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:_SUMMARY_NAMES])
        more = f" and {len(skipped) - _SUMMARY_NAMES} more" if len(skipped) > _SUMMARY_NAMES else ""
        log.warning("skipped %d of %d files under %s: %s%s", len(skipped), len(paths), root, names, more)
    if not readable:
        detail = f"{len(paths)} candidate file(s), all unreadable" if paths else "no image files found"
        raise ValueError(
            f"no readable images in {str(root)!r} ({detail}; searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}). Add images to this folder or point `root` (data.root) "
            f"at a folder that has some."
        )
    return resolve_captions(root, readable, caption_ext)


def warn_upscaled(records: Sequence[ImageRecord], resolution: int, root: Path) -> list[Path]:
    """Warn (once, with a count and names) about images whose shorter side is below ``resolution``: they
    are upscaled, which blurs them. Reads image headers only. Returns those paths."""
    small = []
    for record in records:
        with Image.open(record.path) as image:
            if min(image.size) < resolution:
                small.append((record.path, image.size))
    if small:
        names = ", ".join(f"{p.relative_to(root) if p.is_relative_to(root) else p} ({w}x{h})"
                          for p, (w, h) in small[:_SUMMARY_NAMES])
        more = f" and {len(small) - _SUMMARY_NAMES} more" if len(small) > _SUMMARY_NAMES else ""
        log.warning("%d of %d images are smaller than the training resolution %d px and will be upscaled "
                    "(blurry): %s%s. Use larger images or a lower data.resolution.",
                    len(small), len(records), resolution, names, more)
    return [p for p, _ in small]


class ImageFolderDataset(Dataset):
    """Images (+ captions) -> {"image": float [3, R, R] in [-1, 1], "caption": str}.

    Args:
        root: the folder; scanned (recursively, each file checked once) unless ``files`` is given.
        resolution: output side R; the shorter side is resized to R (Lanczos), then cropped.
        center_crop: center crop if True, else a random crop.
        random_flip: probability of a horizontal flip.
        default_caption: caption of images without a caption file or metadata entry.
        caption_ext: extension of sidecar caption files ("" disables them).
        repeats: each image appears this many times per epoch.
        caption_dropout: probability of replacing the caption by "" (classifier-free guidance).
        files: already-checked images: ``ImageRecord``s, or paths whose captions are looked up.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: float = 0.0,
        default_caption: str = "",
        caption_ext: str = ".txt",
        repeats: int = 1,
        caption_dropout: float = 0.0,
        files: Sequence | None = None,
    ):
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        for name, value in (("random_flip", random_flip), ("caption_dropout", caption_dropout)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        self.root = Path(root)
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = float(random_flip)
        self.default_caption = default_caption
        self.repeats = int(repeats)
        self.caption_dropout = float(caption_dropout)
        if files is None:
            self.records = scan_image_folder(self.root, caption_ext)
        else:
            paths = [f for f in files if not isinstance(f, ImageRecord)]
            resolved = iter(resolve_captions(self.root, paths, caption_ext) if paths else [])
            self.records = [f if isinstance(f, ImageRecord) else next(resolved) for f in files]
            if not self.records:
                raise ValueError(f"ImageFolderDataset for {str(self.root)!r} was given an empty file list")

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def caption(self, record: ImageRecord) -> str:
        return self.default_caption if record.caption is None else record.caption

    def fingerprint(self) -> str:
        """What the items depend on, cheaply (for latent caches): the settings, and every image's path, size
        and modification time with its caption."""
        files = []
        for record in self.records:
            stat = record.path.stat()
            files.append((str(record.path), stat.st_size, stat.st_mtime_ns, self.caption(record)))
        settings = (self.resolution, self.center_crop, self.random_flip, self.repeats, self.caption_dropout)
        return repr((settings, files))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        record = self.records[index % len(self.records)]
        image = load_rgb(record.path, min_side=self.resolution)
        tensor = preprocess(image, self.resolution, self.center_crop, self.random_flip)
        caption = self.caption(record)
        if self.caption_dropout > 0 and float(torch.rand(())) < self.caption_dropout:
            caption = ""
        return {"image": tensor, "caption": caption}


class ImageFolderDataModule(L.LightningDataModule):
    """Train / val split of an image folder; the folder is scanned once, in ``setup()``.

    Validation holds ``val_size`` images (or ``val_fraction`` of them when given), chosen with
    ``seed``, never augmented. With ``val_size=0`` every image trains and validation shows the
    first few training images without augmentation.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: float = 0.5,
        val_size: int = 4,
        default_caption: str = "",
        repeats: int = 1,
        caption_dropout: float = 0.0,
        seed: int = 0,
        val_fraction: float | None = None,
        caption_ext: str = ".txt",
        pin_memory: bool = False,
    ):
        super().__init__()
        _check_root(root)  # fail at construction, before anything else is built
        if val_size < 0 or (val_fraction is not None and not 0.0 <= val_fraction < 1.0):
            raise ValueError(f"need val_size >= 0 and 0 <= val_fraction < 1, got {val_size}, {val_fraction}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.records: list[ImageRecord] | None = None
        self.data_train: ImageFolderDataset | None = None
        self.data_val: ImageFolderDataset | None = None

    def _dataset(self, records: list[ImageRecord], train: bool) -> ImageFolderDataset:
        hp = self.hparams
        return ImageFolderDataset(
            self.root,
            resolution=hp.resolution,
            center_crop=hp.center_crop if train else True,
            random_flip=hp.random_flip if train else 0.0,
            default_caption=hp.default_caption,
            caption_ext=hp.caption_ext,
            repeats=hp.repeats if train else 1,
            caption_dropout=hp.caption_dropout if train else 0.0,
            files=records,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        hp = self.hparams
        records = scan_image_folder(self.root, hp.caption_ext)
        n = len(records)
        n_val = round(hp.val_fraction * n) if hp.val_fraction is not None else int(hp.val_size)
        if n_val > n - 1:
            log.warning(
                "only %d image(s) in %s: using %d for validation instead of %d", n, self.root, n - 1, n_val
            )
            n_val = n - 1
        order = np.random.default_rng(hp.seed).permutation(n)
        val_ids = set(order[:n_val].tolist())
        train_records = [r for k, r in enumerate(records) if k not in val_ids]
        val_records = [r for k, r in enumerate(records) if k in val_ids] or train_records[:4]
        self.records = records
        warn_upscaled(records, hp.resolution, self.root)
        self.data_train = self._dataset(train_records, train=True)
        self.data_val = self._dataset(val_records, train=False)
        log.info(
            "image folder %s: %d train image(s) x %d repeat(s), %d validation image(s)%s",
            self.root,
            len(train_records),
            hp.repeats,
            len(val_records),
            "" if n_val else " (taken from train)",
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
