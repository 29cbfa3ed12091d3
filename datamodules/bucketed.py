"""What every captioned-image source shares: bucketed items and bucket-batched, resumable loaders.

``BucketedImageDataset`` turns records (anything a subclass can open, size and caption) into
{"image": float [3, H, W] in [-1, 1], "caption": str} items: square R x R crops, or with ``bucketing``
the aspect-ratio bucket nearest each image (``datamodules.buckets``), with per-record repeats, random
or centre crops, flips, tag-list caption augmentation and caption dropout. A record that fails to
decode is skipped with one warning and replaced by the next readable record of its bucket. The random
choices of item ``i`` in epoch ``e`` come from a generator seeded by (e, i) (the sampler calls
``set_epoch``), never the global or a worker's RNG: they differ across epochs, yet a resumed run draws
exactly those of the uninterrupted one.

``BucketedDataModule`` gives the loaders: ``BucketBatchSampler`` batches (one bucket each, split across
DDP ranks) and the sampler position saved in checkpoints, so a resumed run continues at the next batch.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.bucket_sampler import BucketBatchSampler, BucketLoader, trainer_position
from datamodules.buckets import assign_buckets, bucket_summary, cover_size, make_buckets
from datamodules.captions import TagAugment
from datamodules.masks import mask_tensor
from datamodules.resumable import resumable_loader
from datamodules.transforms import load_rgb, preprocess, preprocess_to_size
from ldm.utils.data_handover import DataFacts

__all__ = ["BucketedDataModule", "BucketedImageDataset", "dataset_options", "split_indices"]


class BucketedImageDataset(Dataset):
    """Base of the image datasets. Subclasses implement ``num_records``, ``record_size``, ``open_record``
    (a path, a file object or a PIL image), ``record_caption`` and ``record_name``, optionally
    ``record_repeats``, then call ``BucketedImageDataset.__init__``.

    Args:
        resolution: output side R (square), or the bucket area R^2.
        center_crop: center crop if True, else a random crop.
        random_flip: probability of a horizontal flip.
        repeats: the whole dataset appears this many times per epoch.
        caption_dropout: probability of replacing the caption by "" (classifier-free guidance).
        bucketing: aspect-ratio buckets instead of square crops.
        bucket_step: bucket sides are multiples of this (the VAE factor x 8: 64 for SD; None: 64 from
            256 px up, resolution / 4 below).
        bucket_min_side, bucket_max_side: bucket side limits (default R / 2 and 2 R).
        shuffle_tags, keep_tags, tag_dropout, tag_separator: tag-list caption augmentation
            (``datamodules.captions.TagAugment``).
        size_conditions: items also carry SDXL's micro-conditioning of the crop really taken
            (``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``;
            ``transforms.size_conditions``).
    """

    log = logging.getLogger("datamodules.bucketed")

    def __init__(
        self,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: float = 0.0,
        repeats: int = 1,
        caption_dropout: float = 0.0,
        bucketing: bool = False,
        bucket_step: int | None = None,
        bucket_min_side: int | None = None,
        bucket_max_side: int | None = None,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_dropout: float = 0.0,
        tag_separator: str = ",",
        size_conditions: bool = False,
    ):
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        for name, value in (("random_flip", random_flip), ("caption_dropout", caption_dropout)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = float(random_flip)
        self.repeats = int(repeats)
        self.caption_dropout = float(caption_dropout)
        self.size_conditions = bool(size_conditions)
        self.tags = TagAugment(bool(shuffle_tags), int(keep_tags), float(tag_dropout), tag_separator)
        self._unreadable: set[int] = set()  # records found broken when loaded
        self.epoch = 0  # keys the random augmentations (set by the training sampler)
        n = self.num_records()
        # index -> record: per-record repeats (kohya folders), then the whole list ``repeats`` times
        per_pass = np.repeat(np.arange(n), [self.record_repeats(k) for k in range(n)])
        self.index_to_record = np.tile(per_pass, self.repeats)
        self.buckets: list[tuple[int, int]] = [(self.resolution, self.resolution)]
        self.record_buckets = [0] * n
        if bucketing:
            self.buckets = make_buckets(self.resolution, bucket_step, bucket_min_side, bucket_max_side)
            self.record_buckets = assign_buckets([self.record_size(k) for k in range(n)], self.buckets)

    # -- what subclasses give ------------------------------------------------------------------------
    def num_records(self) -> int:
        raise NotImplementedError

    def record_size(self, record_id: int) -> tuple[int, int]:
        """(width, height) as loaded (EXIF rotation applied)."""
        raise NotImplementedError

    def open_record(self, record_id: int):
        raise NotImplementedError

    def record_caption(self, record_id: int) -> str:
        raise NotImplementedError

    def record_name(self, record_id: int) -> str:
        return f"record {record_id}"

    def record_repeats(self, record_id: int) -> int:
        return 1

    # -- items ---------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def augmentation_generator(self, index: int) -> torch.Generator:
        """The generator of item ``index``'s random crop, flip, tag and caption choices this epoch."""
        seed = np.random.SeedSequence([self.epoch, int(index) % len(self)]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.index_to_record)

    @property
    def bucket_ids(self) -> list[int]:
        """The bucket of every index (what ``BucketBatchSampler`` takes)."""
        return np.asarray(self.record_buckets, dtype=np.int64)[self.index_to_record].tolist()

    def target_size(self, index: int) -> tuple[int, int]:
        """(width, height) of item ``index``."""
        return self.buckets[self.record_buckets[int(self.index_to_record[index])]]

    def summary(self) -> str:
        """The buckets in use and their image counts."""
        return bucket_summary(self.buckets, self.record_buckets)

    def open_mask(self, record_id: int):
        """The record's mask as a PIL image (subclasses that have masks; ``datamodules/masks.py``)."""
        raise NotImplementedError(f"{type(self).__name__} has no masks")

    def _load_mask(self, record_id: int, target: tuple[int, int], generator_state: torch.Tensor):
        """The mask ``[1, H, W]`` through the resize, crop and flip its image got (the same random draws)."""
        generator = torch.Generator().set_state(generator_state)
        loaded = self._load(record_id, target, generator, source=self.open_mask(record_id))
        return mask_tensor(loaded[0] if isinstance(loaded, tuple) else loaded)

    def _load(self, record_id: int, target: tuple[int, int], generator: torch.Generator, source=None):
        """The item's image tensor; with ``size_conditions``, (it, its size conditions). ``source``: another
        picture of the record (its mask) instead of the record's image."""
        source = self.open_record(record_id) if source is None else source
        sizes = {"with_sizes": self.size_conditions}
        if self.size_conditions and not isinstance(source, Image.Image):  # its size before any draft decoding
            sizes["original_size"] = self.record_size(record_id)
        if target[0] == target[1] == self.resolution:  # square: the classic shorter-side resize
            image = load_rgb(source, min_side=self.resolution)
            return preprocess(image, self.resolution, self.center_crop, self.random_flip, generator, **sizes)
        min_side = (
            None if isinstance(source, Image.Image) else min(cover_size(*self.record_size(record_id), target))
        )
        return preprocess_to_size(
            load_rgb(source, min_side=min_side),
            target,
            self.center_crop,
            self.random_flip,
            generator,
            **sizes,
        )

    def _stand_ins(self, record_id: int):
        """``record_id``, then the other records of its bucket (after it, cyclically) not known bad."""
        bucket, n = self.record_buckets[record_id], len(self.record_buckets)
        for k in range(n):
            other = (record_id + k) % n
            if self.record_buckets[other] == bucket and other not in self._unreadable:
                yield other

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        target, generator = self.target_size(index), self.augmentation_generator(index)
        for record_id in self._stand_ins(int(self.index_to_record[index])):
            try:
                state = generator.get_state()
                loaded = self._load(record_id, target, generator)
                break
            except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this image"
                self._unreadable.add(record_id)
                self.log.warning(
                    "skipping unreadable image %s (%s: %s); %d unreadable so far",
                    self.record_name(record_id),
                    type(error).__name__,
                    error,
                    len(self._unreadable),
                )
        else:
            raise RuntimeError(
                f"every image of bucket {target[0]}x{target[1]} is unreadable (see the "
                f"warnings above); remove or replace the broken files"
            )
        caption = self.tags(self.record_caption(record_id), generator)
        if self.caption_dropout > 0 and float(torch.rand((), generator=generator)) < self.caption_dropout:
            caption = ""
        mask = {"mask": self._load_mask(record_id, target, state)} if getattr(self, "masks", False) else {}
        if self.size_conditions:
            return {"image": loaded[0], "caption": caption, **loaded[1], **mask}
        return {"image": loaded, "caption": caption, **mask}


def dataset_options(hp, train: bool) -> dict:
    """The ``BucketedImageDataset`` arguments from a datamodule's hyperparameters: the configured
    augmentations and repeats for training, none of them (centre crops, captions as written) for
    validation."""
    return {
        "resolution": hp.resolution,
        "center_crop": hp.center_crop if train else True,
        "random_flip": hp.random_flip if train else 0.0,
        "repeats": hp.repeats if train else 1,
        "caption_dropout": hp.caption_dropout if train else 0.0,
        "bucketing": hp.bucketing,
        "bucket_step": hp.bucket_step,
        "bucket_min_side": hp.bucket_min_side,
        "bucket_max_side": hp.bucket_max_side,
        "shuffle_tags": hp.shuffle_tags if train else False,
        "keep_tags": hp.keep_tags,
        "tag_dropout": hp.tag_dropout if train else 0.0,
        "tag_separator": hp.tag_separator,
        "size_conditions": hp.get("size_conditions", False),
    }


def split_indices(
    n: int, val_size: int, val_fraction: float | None, seed: int, log: logging.Logger, where: str
) -> tuple[list[int], list[int]]:
    """(train, val) record indices: ``val_size`` (or ``val_fraction``) held out with ``seed``; with none
    held out, validation shows the first few training records."""
    n_val = round(val_fraction * n) if val_fraction is not None else int(val_size)
    if n_val > n - 1:
        log.warning("only %d image(s) in %s: using %d for validation instead of %d", n, where, n - 1, n_val)
        n_val = n - 1
    order = np.random.default_rng(seed).permutation(n)
    val_ids = set(order[:n_val].tolist())
    train = [k for k in range(n) if k not in val_ids]
    val = [k for k in range(n) if k in val_ids] or train[:4]
    return train, val


class BucketedDataModule(L.LightningDataModule):
    """Loaders and resume state for ``data_train`` / ``data_val`` (``BucketedImageDataset``-like: with
    ``bucket_ids``). Subclasses set ``batch_size``, ``num_workers``, ``pin_memory`` and have ``bucketing``
    and ``seed`` hyperparameters."""

    batch_size: int = 4
    num_workers: int = 0
    pin_memory: bool = False
    _position: dict | None = None  # where a resumed run continues (from a checkpoint)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # training: workers start afresh each epoch, so that they see the dataset's epoch (augmentations)
        common = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0 and not shuffle,
        }
        seed = self.hparams.get("seed", 0)
        if not self.hparams.get("bucketing", False):
            if shuffle:  # the seeded order that resumes mid-epoch (its position is in checkpoints)
                return resumable_loader(dataset, self.batch_size, seed=seed, **common)
            return DataLoader(dataset, batch_size=self.batch_size, **common)
        position, self._position = (self._position, None) if shuffle else (None, self._position)
        sampler = BucketBatchSampler(
            dataset.bucket_ids,
            self.batch_size,
            shuffle=shuffle,
            seed=seed,
            position=position,
            dataset=dataset if shuffle else None,
        )
        return BucketLoader(dataset, batch_sampler=sampler, **common)

    def data_facts(self) -> DataFacts:
        """What a model may know of this data (``ldm/utils/data_handover.py``): the training size."""
        return DataFacts(resolution=self.hparams.get("resolution"))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        """The training position of bucketed batches (``bucket_sampler.trainer_position``; square crops: the
        resumable loader keeps its own, ``datamodules/resumable.py``)."""
        return trainer_position(getattr(self, "trainer", None))

    def load_state_dict(self, state_dict: dict) -> None:
        self._position = state_dict.get("bucket_position")
