"""A local Hugging Face ``datasets`` dataset with image and text columns, as diffusers' training examples
take it: a ``save_to_disk`` folder, parquet file(s), or an ``imagefolder`` with ``metadata.jsonl``.

Offline: nothing is fetched (local paths only). Images are read undecoded (``Image(decode=False)``): only
the headers are read at ``setup()`` (for the buckets), each image is decoded when its item is loaded.
A caption column holding a list of captions gives a random one per training item (one fixed in
validation), as diffusers' ``train_text_to_image.py`` does.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch

from datamodules.bucketed import BucketedDataModule, BucketedImageDataset, dataset_options, split_indices

__all__ = ["HFDatasetDataModule", "HFImageDataset", "load_local_dataset", "pick_columns"]

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")


def _import_datasets():
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        raise ImportError(
            "data=hf_dataset needs the `datasets` package: pip install 'ldm-lightning[data]'"
        ) from error
    return datasets


def load_local_dataset(path: str | os.PathLike, split: str = "train", cache_dir: str | None = None):
    """The ``split`` of a local dataset: ``save_to_disk`` folder, ``.parquet`` file(s) or an imagefolder."""
    datasets = _import_datasets()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {str(path)!r} does not exist: point data.path at a save_to_disk "
            f"folder, a .parquet file or folder, or an image folder with metadata.jsonl"
        )
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
        loaded = datasets.load_dataset("parquet", data_files={split: files}, cache_dir=cache_dir)
    else:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise KeyError(
                f"dataset {str(path)!r} has splits {sorted(loaded)}, not {split!r}; set data.split"
            )
        loaded = loaded[split]
    return loaded


def pick_columns(dataset, image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    """The image column (given, or the first ``Image`` feature) and caption column (given, or the first of
    text / caption / captions / prompt)."""
    datasets = _import_datasets()
    features = dataset.features
    if image_column is None:
        image_column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if caption_column is None:
        caption_column = next((k for k in CAPTION_COLUMNS if k in features), None)
    for role, name in (("image", image_column), ("caption", caption_column)):
        if name is None or name not in features:
            raise KeyError(
                f"no {role} column {'named ' + repr(name) + ' ' if name else ''}in the dataset "
                f"(columns: {list(features)}); set data.{role}_column"
            )
    return image_column, caption_column


class HFImageDataset(BucketedImageDataset):
    """Rows ``rows`` of an undecoded HF dataset -> {"image", "caption"} (``BucketedImageDataset`` arguments
    in ``kwargs``)."""

    def __init__(
        self,
        dataset,
        rows: list[int],
        sizes: list[tuple[int, int]],
        image_column: str,
        caption_column: str,
        random_caption: bool = True,
        **kwargs,
    ):
        self.dataset, self.rows, self.sizes = dataset, list(rows), list(sizes)
        self.image_column, self.caption_column, self.random_caption = (
            image_column,
            caption_column,
            random_caption,
        )
        super().__init__(**kwargs)

    def num_records(self) -> int:
        return len(self.rows)

    def record_size(self, record_id: int) -> tuple[int, int]:
        return self.sizes[record_id]

    def open_record(self, record_id: int):
        value = self.dataset[self.rows[record_id]][self.image_column]
        return io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]

    def record_name(self, record_id: int) -> str:
        return f"row {self.rows[record_id]} of the dataset"

    def record_caption(self, record_id: int) -> str:
        caption = self.dataset[self.rows[record_id]][self.caption_column]
        if isinstance(caption, (list, tuple)):
            if not caption:
                return ""
            k = int(torch.randint(0, len(caption), ())) if self.random_caption else 0
            caption = caption[k]
        return "" if caption is None else str(caption)


def _header_sizes(dataset, image_column: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(readable rows, their (width, height)) from the image headers; unreadable rows are reported."""
    from datamodules.transforms import image_size

    rows, sizes, bad = [], [], []
    for row, value in enumerate(dataset.select_columns([image_column])):
        value = value[image_column]
        try:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            sizes.append(image_size(source))
            rows.append(row)
        except Exception as error:  # noqa: BLE001 - an unreadable header means "skip this row"
            bad.append(row)
            log.warning("skipping unreadable image in row %d (%s: %s)", row, type(error).__name__, error)
    if bad:
        log.warning("skipped %d of %d rows with unreadable images", len(bad), len(dataset))
    if not rows:
        raise ValueError(f"no readable image in the {len(dataset)} row(s) of the dataset")
    return rows, sizes


class HFDatasetDataModule(BucketedDataModule):
    """Train / val split of a local HF dataset (``path``, ``split``); image and caption columns found or
    given.

    The other arguments are those of ``ImageFolderDataModule`` (aspect-ratio buckets on by default).
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str | None = None,
        caption_column: str | None = None,
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: float = 0.5,
        val_size: int = 4,
        val_fraction: float | None = None,
        seed: int = 0,
        repeats: int = 1,
        caption_dropout: float = 0.0,
        bucketing: bool = True,
        bucket_step: int | None = None,
        bucket_min_side: int | None = None,
        bucket_max_side: int | None = None,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_dropout: float = 0.0,
        tag_separator: str = ",",
        cache_dir: str | None = None,
        pin_memory: bool = False,
        size_conditions: bool = False,  # SDXL: items carry the crop's size conditions
    ):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.data_train: HFImageDataset | None = None
        self.data_val: HFImageDataset | None = None

    def _dataset(self, dataset, rows, sizes, columns, train: bool) -> HFImageDataset:
        return HFImageDataset(
            dataset, rows, sizes, *columns, random_caption=train, **dataset_options(self.hparams, train)
        )

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        hp = self.hparams
        datasets = _import_datasets()
        dataset = load_local_dataset(hp.path, hp.split, hp.cache_dir)
        columns = pick_columns(dataset, hp.image_column, hp.caption_column)
        dataset = dataset.cast_column(columns[0], datasets.Image(decode=False))
        rows, sizes = _header_sizes(dataset, columns[0])
        train_ids, val_ids = split_indices(
            len(rows), hp.val_size, hp.val_fraction, hp.seed, log, str(hp.path)
        )
        self.data_train = self._dataset(
            dataset, [rows[k] for k in train_ids], [sizes[k] for k in train_ids], columns, train=True
        )
        self.data_val = self._dataset(
            dataset, [rows[k] for k in val_ids], [sizes[k] for k in val_ids], columns, train=False
        )
        log.info(
            "HF dataset %s (%s, columns %s / %s): %d train, %d validation image(s)",
            hp.path,
            hp.split,
            *columns,
            len(train_ids),
            len(val_ids),
        )
        if hp.bucketing:
            log.info(
                "aspect-ratio buckets (train, resolution %d): %s", hp.resolution, self.data_train.summary()
            )
