"""Sharded datasets: WebDataset tar shards plus an index, read with random access for buckets.

Format (written by ``scripts/make_shards.py``): ``<split>-000000.tar``, ... in WebDataset layout (every
sample is ``<key>.<png|jpg|...>``, ``<key>.txt`` (caption) and ``<key>.json`` ({"width", "height",
"bucket": [w, h], "repeats"}) next to each other), and ``index.json``: per split, the shard names and,
for every sample, its shard, the byte offset and size of its image and caption inside the tar, its size
and repeats. Any WebDataset reader streams these shards as they are (``tar`` lists them, too).

Why WebDataset and not litdata: tar shards are a plain, tool-independent format written with a tiny
dependency (``webdataset``: two small packages), while the current litdata release pulls in torchvision
and a newer CUDA build of torch, which replaces the CPU torch this project pins. The index lets this
reader seek to any sample in a local (or network-mounted) shard, so the same ``BucketBatchSampler`` as
for folders gives single-bucket batches, disjoint DDP ranks and an exact mid-epoch resume, which a
sequential stream cannot.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from datamodules.bucketed import BucketedDataModule, BucketedImageDataset, dataset_options, split_indices
from datamodules.buckets import assign_buckets, make_buckets
from ldm.utils.files import atomic_write_text

__all__ = ["INDEX_FILE", "ShardDataset", "ShardsDataModule", "read_index", "write_shards"]

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_VERSION = 1
_COLUMNS = ("shard", "image_offset", "image_size", "text_offset", "text_size", "width", "height", "repeats")


def _index_shard(path: Path, shard_id: int, columns: dict) -> None:
    """Append the byte offsets of every sample of one written shard to ``columns``."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            members.setdefault(key, {})[ext] = member
        meta = {key: json.loads(tar.extractfile(parts["json"]).read()) for key, parts in members.items()}
    for key, parts in members.items():
        image = next(m for ext, m in parts.items() if ext not in ("txt", "json"))
        text = parts["txt"]
        values = (
            shard_id,
            image.offset_data,
            image.size,
            text.offset_data,
            text.size,
            meta[key]["width"],
            meta[key]["height"],
            meta[key].get("repeats", 1),
        )
        for name, value in zip(_COLUMNS, values):
            columns[name].append(int(value))


def write_shards(
    out_dir: str | os.PathLike,
    samples: Iterable[dict],
    split: str = "train",
    shard_size: int = 1000,
    resolution: int = 512,
    bucket_step: int | None = None,
) -> dict:
    """Write ``samples`` ({"image": encoded bytes, "ext": "png", "caption", "width", "height",
    "repeats"}) as WebDataset shards of ``shard_size`` samples and add ``split`` to ``index.json``.

    The bucket of each sample for ``resolution`` / ``bucket_step`` is stored in its json.
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buckets = make_buckets(resolution, bucket_step)
    shard_names, columns = [], {name: [] for name in _COLUMNS}
    writer = None
    for count, sample in enumerate(samples):
        if count % shard_size == 0:
            if writer is not None:
                writer.close()
                _index_shard(out / shard_names[-1], len(shard_names) - 1, columns)
            shard_names.append(f"{split}-{len(shard_names):06d}.tar")
            writer = wds.TarWriter(str(out / shard_names[-1]))
        bucket = buckets[assign_buckets([(sample["width"], sample["height"])], buckets)[0]]
        meta = {
            "width": sample["width"],
            "height": sample["height"],
            "bucket": list(bucket),
            "repeats": int(sample.get("repeats", 1)),
        }
        writer.write(
            {
                "__key__": f"{count:09d}",
                sample["ext"]: sample["image"],
                "txt": sample["caption"],
                "json": meta,
            }
        )
    if writer is None:
        raise ValueError(f"no samples to write for split {split!r}")
    writer.close()
    _index_shard(out / shard_names[-1], len(shard_names) - 1, columns)
    index_path = out / INDEX_FILE
    index = read_index(out) if index_path.is_file() else {"version": INDEX_VERSION, "splits": {}}
    index.update(resolution=int(resolution), bucket_step=bucket_step, buckets=[list(b) for b in buckets])
    index["splits"][split] = {"shards": shard_names, **columns}
    atomic_write_text(index_path, json.dumps(index))
    return index


def read_index(path: str | os.PathLike) -> dict:
    index_path = Path(path) / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"no {INDEX_FILE} in {str(path)!r}: make shards with "
            f"`python scripts/make_shards.py --folder <images> --out {path}` first"
        )
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("version") != INDEX_VERSION:
        raise ValueError(
            f"{index_path} has index version {index.get('version')}, this reader needs "
            f"{INDEX_VERSION}: rewrite the shards with scripts/make_shards.py"
        )
    return index


class ShardDataset(BucketedImageDataset):
    """Samples ``rows`` of one split of a shard set (``BucketedImageDataset`` arguments in ``kwargs``)."""

    def __init__(self, path: str | os.PathLike, split_index: dict, rows: list[int], **kwargs):
        self.path, self.split_index, self.rows = Path(path), split_index, list(rows)
        self._files: dict[int, object] = {}
        super().__init__(**kwargs)

    def __getstate__(self) -> dict:  # open file handles stay in their process
        return {**self.__dict__, "_files": {}}

    def close(self) -> None:
        """Close the shard files this process opened (a later read opens them again)."""
        for handle in getattr(self, "_files", {}).values():
            handle.close()
        self._files = {}

    def __del__(self) -> None:  # no "unclosed file" ResourceWarning when a dataset is dropped
        self.close()

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open(self.path / self.split_index["shards"][shard], "rb")  # noqa: SIM115
        handle.seek(offset)
        return handle.read(size)

    def _column(self, name: str, record_id: int) -> int:
        return self.split_index[name][self.rows[record_id]]

    def num_records(self) -> int:
        return len(self.rows)

    def record_size(self, record_id: int) -> tuple[int, int]:
        return self._column("width", record_id), self._column("height", record_id)

    def record_repeats(self, record_id: int) -> int:
        return self._column("repeats", record_id)

    def open_record(self, record_id: int) -> io.BytesIO:
        shard = self._column("shard", record_id)
        return io.BytesIO(
            self._read(shard, self._column("image_offset", record_id), self._column("image_size", record_id))
        )

    def record_caption(self, record_id: int) -> str:
        shard = self._column("shard", record_id)
        data = self._read(shard, self._column("text_offset", record_id), self._column("text_size", record_id))
        return data.decode("utf-8")

    def record_name(self, record_id: int) -> str:
        row = self.rows[record_id]
        return f"sample {row} of {self.split_index['shards'][self._column('shard', record_id)]}"


class ShardsDataModule(BucketedDataModule):
    """Train on the ``train`` split of a shard set; validate on its ``val`` split (first ``val_size``
    samples) or, without one, on ``val_size`` samples held out of ``train``. ``train_size`` caps the
    training samples (None: all). The other arguments are those of ``ImageFolderDataModule``.
    """

    def __init__(
        self,
        path: str,
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        train_size: int | None = None,
        val_size: int = 4,
        center_crop: bool = True,
        random_flip: float = 0.0,
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
        pin_memory: bool = False,
        size_conditions: bool = False,  # SDXL: items carry the crop's size conditions
    ):
        super().__init__()
        self.save_hyperparameters()
        self.index = read_index(path)  # fail at construction when there are no shards
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.resolution = resolution
        self.data_train: ShardDataset | None = None
        self.data_val: ShardDataset | None = None

    def _dataset(self, split: str, rows: list[int], train: bool) -> ShardDataset:
        return ShardDataset(
            self.hparams.path, self.index["splits"][split], rows, **dataset_options(self.hparams, train)
        )

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        hp, splits = self.hparams, self.index["splits"]
        if "train" not in splits:
            raise KeyError(f"shard set {hp.path!r} has splits {sorted(splits)}, no 'train'")
        n_train = len(splits["train"]["shard"])
        if "val" in splits:
            train_rows = list(range(n_train))
            val_rows = list(range(min(max(1, int(hp.val_size)), len(splits["val"]["shard"]))))
            val_split = "val"
        else:
            train_rows, val_rows = split_indices(n_train, hp.val_size, None, hp.seed, log, str(hp.path))
            val_split = "train"
        if hp.train_size is not None:
            train_rows = train_rows[: int(hp.train_size)]
        self.data_train = self._dataset("train", train_rows, train=True)
        self.data_val = self._dataset(val_split, val_rows, train=False)
        log.info(
            "shards %s: %d train sample(s) in %d shard(s), %d validation sample(s) (%s split)",
            hp.path,
            len(train_rows),
            len(splits["train"]["shards"]),
            len(val_rows),
            val_split,
        )
        if hp.bucketing:
            log.info(
                "aspect-ratio buckets (train, resolution %d): %s", hp.resolution, self.data_train.summary()
            )
