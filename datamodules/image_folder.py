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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from datamodules.bucketed import BucketedDataModule, BucketedImageDataset, dataset_options, split_indices
from datamodules.captions import kohya_subset
from datamodules.folder_index import load_or_build_index
from datamodules.masks import is_mask_file, open_mask
from datamodules.transforms import IMAGE_EXTENSIONS, image_size
from ldm.utils.file_identity import sha256_of

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
DECODE_ALL_MAX_FILES = 2000  # check="auto": larger folders start from the header index (lazy decode check)


@dataclass(frozen=True)
class ImageRecord:
    """One usable image and its caption (None: no caption file, use the default).

    ``size``: (width, height) as loaded (EXIF rotation applied), None when not read yet.
    ``repeats`` and ``class_name`` come from a kohya ``<repeats>_<name>`` folder (the name is the
    caption of images without a caption file).
    """

    path: Path
    caption: str | None = None
    size: tuple[int, int] | None = None
    repeats: int = 1
    class_name: str | None = None


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
            extension = os.path.splitext(name)[1].lower()
            if not name.startswith(".") and extension in IMAGE_EXTENSIONS and not is_mask_file(name):
                found.append(os.path.join(dirpath, name))
    found.sort(key=lambda path: path.split(os.sep))  # Path's order (by parts), on strings: much faster
    return [Path(path) for path in found]


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
    sidecar = os.path.splitext(path)[0] + "." + caption_ext.lstrip(".")  # str ops: 20,000 files add up
    try:
        with open(sidecar, "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"caption file {sidecar} is not UTF-8 text (byte 0x{data[error.start]:02x} at position "
            f"{error.start}); re-save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
        ) from None


def resolve_captions(
    root: str | os.PathLike, paths: Sequence, caption_ext: str = ".txt"
) -> list[ImageRecord]:
    """Attach captions (sidecar, then metadata.jsonl) and kohya folder repeats / names to image paths
    under ``root``."""
    root = Path(root).expanduser()
    metadata = _read_metadata(root)
    records = []
    subsets: dict[str, tuple[int, str] | None] = {}  # first folder under root -> kohya (repeats, name)
    for path in map(Path, paths):
        caption = _sidecar_caption(path, caption_ext) if caption_ext else None
        if caption is None and metadata:
            caption = metadata.get(path.resolve())
        text, prefix = str(path), str(root) + os.sep
        if text.startswith(prefix):  # one kohya_subset per first-level folder
            first = text[len(prefix) :].split(os.sep, 1)[0]
            if first not in subsets:
                subsets[first] = kohya_subset(root, path)
            subset = subsets[first]
        else:
            subset = kohya_subset(root, path)
        repeats, class_name = subset or (1, None)
        records.append(ImageRecord(path, caption, repeats=repeats, class_name=class_name))
    return records


def _decode_all(paths: list[Path]) -> tuple[dict[Path, tuple[int, int]], dict[Path, str]]:
    sizes, bad = {}, {}
    for path in paths:
        reason = check_image(path)
        if reason is None:
            sizes[path] = image_size(path)
        else:
            bad[path] = reason
    return sizes, bad


def _from_index(root: Path, paths: list[Path], index_dir) -> tuple[dict, dict]:
    index = load_or_build_index(root, paths, index_dir)
    by_rel = {path.relative_to(root).as_posix(): path for path in paths}
    sizes = {by_rel[rel]: tuple(size) for rel, size in index["sizes"].items()}
    return sizes, {by_rel[rel]: reason for rel, reason in index["unreadable"].items()}


def scan_image_folder(
    root: str | os.PathLike,
    caption_ext: str = ".txt",
    check: str = "auto",
    index_dir: str | os.PathLike | None = None,
) -> list[ImageRecord]:
    """Find, check and caption every image under ``root``; records carry the image sizes.

    ``check``: "decode" opens and decodes every image now; "header" reads only the headers, through
    the index cached in ``index_dir`` (``datamodules.folder_index``), leaving the decoding check to the
    first load; "auto": "decode" up to ``DECODE_ALL_MAX_FILES`` files, else "header". Unreadable files
    are skipped with one warning each and a summary. Raises FileNotFoundError for a missing folder and
    ValueError when no image is readable.
    """
    root = _check_root(root)
    paths = find_image_files(root)
    if check == "auto":
        check = "decode" if len(paths) <= DECODE_ALL_MAX_FILES else "header"
    if check not in ("decode", "header"):
        raise ValueError(f"check must be 'auto', 'decode' or 'header', got {check!r}")
    sizes, bad = _decode_all(paths) if check == "decode" else _from_index(root, paths, index_dir)
    for path, reason in bad.items():
        log.warning("skipping unreadable image %s (%s)", path, reason)
    if bad:
        skipped = sorted(bad)
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:_SUMMARY_NAMES])
        more = f" and {len(skipped) - _SUMMARY_NAMES} more" if len(skipped) > _SUMMARY_NAMES else ""
        log.warning("skipped %d of %d files under %s: %s%s", len(skipped), len(paths), root, names, more)
    readable = [p for p in paths if p in sizes]
    if not readable:
        detail = f"{len(paths)} candidate file(s), all unreadable" if paths else "no image files found"
        raise ValueError(
            f"no readable images in {str(root)!r} ({detail}; searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}). Add images to this folder or point `root` (data.root) "
            f"at a folder that has some."
        )
    return [replace(r, size=sizes[r.path]) for r in resolve_captions(root, readable, caption_ext)]


def warn_upscaled(records: Sequence[ImageRecord], resolution: int, root: Path) -> list[Path]:
    """Warn (once, with a count and names) about images whose shorter side is below ``resolution``: they
    are upscaled, which blurs them. Reads image headers only. Returns those paths."""
    small = []
    for record in records:
        size = record.size if record.size is not None else image_size(record.path)
        if min(size) < resolution:
            small.append((record.path, size))
    if small:
        names = ", ".join(
            f"{p.relative_to(root) if p.is_relative_to(root) else p} ({w}x{h})"
            for p, (w, h) in small[:_SUMMARY_NAMES]
        )
        more = f" and {len(small) - _SUMMARY_NAMES} more" if len(small) > _SUMMARY_NAMES else ""
        log.warning(
            "%d of %d images are smaller than the training resolution %d px and will be upscaled "
            "(blurry): %s%s. Use larger images or a lower data.resolution.",
            len(small),
            len(records),
            resolution,
            names,
            more,
        )
    return [p for p, _ in small]


class ImageFolderDataset(BucketedImageDataset):
    """Images (+ captions) of a folder -> {"image": float [3, H, W] in [-1, 1], "caption": str}.

    Without buckets every image is R x R (shorter side resized to R, then cropped); with ``bucketing``
    each image covers its aspect-ratio bucket (see ``BucketedImageDataset`` for the shared arguments).

    Args:
        root: the folder; scanned (recursively, each file checked once) unless ``files`` is given.
        default_caption: caption of images without a caption file, metadata entry or kohya folder name.
        caption_ext: extension of sidecar caption files ("" disables them).
        files: already-checked images: ``ImageRecord``s, or paths whose captions are looked up.
        **kwargs: ``BucketedImageDataset`` arguments (resolution, center_crop, random_flip, repeats,
            caption_dropout, bucketing, bucket_step, ..., shuffle_tags, keep_tags, tag_dropout). Images of a
            kohya ``<repeats>_<name>`` folder repeat ``<repeats>`` x ``repeats`` times.
    """

    log = log

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 512,
        default_caption: str = "",
        caption_ext: str = ".txt",
        files: Sequence | None = None,
        **kwargs,
    ):
        self.root = Path(root)
        self.default_caption = default_caption
        self.records = self._records(files, caption_ext)
        super().__init__(resolution=resolution, **kwargs)

    def _records(self, files: Sequence | None, caption_ext: str) -> list[ImageRecord]:
        if files is None:
            return scan_image_folder(self.root, caption_ext)
        paths = [f for f in files if not isinstance(f, ImageRecord)]
        resolved = iter(resolve_captions(self.root, paths, caption_ext) if paths else [])
        records = [f if isinstance(f, ImageRecord) else next(resolved) for f in files]
        if not records:
            raise ValueError(f"ImageFolderDataset for {str(self.root)!r} was given an empty file list")
        return records

    def num_records(self) -> int:
        return len(self.records)

    def record_size(self, record_id: int) -> tuple[int, int]:
        record = self.records[record_id]
        return record.size if record.size is not None else image_size(record.path)

    def open_record(self, record_id: int) -> Path:
        return self.records[record_id].path

    def record_name(self, record_id: int) -> str:
        return str(self.records[record_id].path)

    def enable_masks(self) -> None:
        """Items also carry ``mask`` (``cat.mask.png`` or the alpha channel); every mask is checked now."""
        for record in self.records:
            open_mask(record.path)
        self.masks = True

    def open_mask(self, record_id: int):
        return open_mask(self.records[record_id].path)[0]

    def record_repeats(self, record_id: int) -> int:
        return self.records[record_id].repeats

    def record_caption(self, record_id: int) -> str:
        return self.caption(self.records[record_id])

    def record_at(self, index: int) -> ImageRecord:
        return self.records[int(self.index_to_record[index])]

    def caption(self, record: ImageRecord) -> str:
        """Caption file or metadata, else the kohya folder name, else ``default_caption``."""
        if record.caption is not None:
            return record.caption
        return record.class_name if record.class_name is not None else self.default_caption

    def fingerprint(self, check: str = "stat") -> str:
        """What the items depend on (for latent caches): the settings, and every image's path with its caption
        and repeats, and its size and modification time (``check="stat"``, cheap) or the SHA-256 of its bytes
        (``check="hash"``: also sees an image replaced by one of the same size and time, ``cp -p``)."""
        files = []
        for record in self.records:
            if check == "hash":
                identity: tuple = (sha256_of(record.path),)
            else:
                stat = record.path.stat()
                identity = (stat.st_size, stat.st_mtime_ns)
            files.append((str(record.path), *identity, self.caption(record), record.repeats))
        settings = (
            self.resolution,
            self.center_crop,
            self.random_flip,
            self.repeats,
            self.caption_dropout,
            getattr(self, "buckets", None),
            repr(self.tags),
        )
        return repr((settings, files))


class ImageFolderDataModule(BucketedDataModule):
    """Train / val split of an image folder; the folder is scanned once, in ``setup()``.

    Validation holds ``val_size`` images (or ``val_fraction`` of them when given), chosen with
    ``seed``, never augmented. With ``val_size=0`` every image trains and validation shows the
    first few training images without augmentation.

    ``bucketing`` (the default): aspect-ratio buckets (see ``datamodules.buckets``); batches come from
    ``BucketBatchSampler`` (one bucket per batch, shuffled with ``seed`` and the epoch, split across
    DDP ranks), the bucket summary is logged at ``setup()``, and the position in the epoch is saved in
    checkpoints (``state_dict``) so a resumed run continues at the next batch.

    Trainer-style folders: images under ``<root>/<repeats>_<name>/`` (kohya) repeat ``repeats`` times and
    are captioned ``name`` when they have no caption file; ``caption_ext`` names the caption files
    (``.txt``, ``.caption``); ``shuffle_tags`` / ``keep_tags`` / ``tag_dropout`` augment tag-list captions
    in training.

    Large folders: ``check="auto"`` decodes every image at ``setup()`` only up to
    ``DECODE_ALL_MAX_FILES`` files; larger folders start from a header index cached in ``index_dir``
    (see ``scan_image_folder``), and broken files are skipped when first loaded.
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
        bucketing: bool = True,
        bucket_step: int | None = None,
        bucket_min_side: int | None = None,
        bucket_max_side: int | None = None,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_dropout: float = 0.0,
        tag_separator: str = ",",
        check: str = "auto",
        index_dir: str | os.PathLike | None = None,
        size_conditions: bool = False,
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
        self._position: dict | None = None  # where a resumed run continues (from a checkpoint)
        self.read_captions = True

    def skip_captions(self) -> None:
        """The model reads no text (a VAE): caption files are then never opened (``connect_data``)."""
        self.read_captions = False

    @property
    def caption_ext(self) -> str:
        return self.hparams.caption_ext if self.read_captions else ""

    def _dataset(self, records: list[ImageRecord], train: bool) -> ImageFolderDataset:
        hp = self.hparams
        return ImageFolderDataset(
            self.root,
            default_caption=hp.default_caption,
            caption_ext=self.caption_ext,
            files=records if train else [replace(r, repeats=1) for r in records],
            **dataset_options(hp, train),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        hp = self.hparams
        records = scan_image_folder(self.root, self.caption_ext, hp.check, hp.index_dir)
        train_ids, val_ids = split_indices(
            len(records), hp.val_size, hp.val_fraction, hp.seed, log, str(self.root)
        )
        train_records = [records[k] for k in train_ids]
        val_records = [records[k] for k in val_ids]
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
            "" if set(val_ids) - set(train_ids) else " (taken from train)",
        )
        subsets = Counter((r.repeats, r.class_name) for r in train_records if r.class_name is not None)
        for (repeats, name), count in sorted(subsets.items()):
            log.info("kohya folder %r: %d image(s) x %d repeat(s)", f"{repeats}_{name}", count, repeats)
        if hp.bucketing:
            log.info(
                "aspect-ratio buckets (train, resolution %d): %s", hp.resolution, self.data_train.summary()
            )
