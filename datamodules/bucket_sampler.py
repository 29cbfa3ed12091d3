"""Batches that never mix buckets: shuffled within and across buckets, split across DDP ranks,
resumable mid-epoch.

Every epoch, all ranks compute the same global batch list from ``(seed, epoch)``: each bucket's items
are shuffled and cut into batches of ``batch_size`` (a bucket's last batch may be smaller, unless
``drop_last``), then the batches of all buckets are shuffled together. Rank r takes global batches
r, r + R, r + 2R, ... of the first ``R * floor(n / R)`` batches, so ranks see disjoint items and the
same number of steps (DDP would hang otherwise). Without shuffling (validation) the last batches are
repeated up to a multiple of R instead, so that every item is evaluated.

Under DDP, Lightning re-creates a ``BatchSampler`` subclass made in ``*_dataloader()`` with a
``DistributedSampler`` as ``sampler``; this class only reads the rank and world size from it (the
order stays ours). Resuming: ``position={"epoch", "batches_done"}`` makes the next epoch
iterated be ``epoch`` and skips its first ``batches_done`` batches of this rank. With ``dataset``, each
iteration first tells the dataset (and the datasets it wraps) its epoch, for per-epoch random choices
(augmentations, flip variants) that resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from datamodules.samplers import set_dataset_epoch

__all__ = ["BucketBatchSampler", "BucketLoader", "trainer_position"]


class BucketBatchSampler(BatchSampler):
    """Lists of dataset indices, all from one bucket.

    Args:
        bucket_ids: the bucket of every dataset index (``len(bucket_ids) == len(dataset)``).
        batch_size: items per batch.
        shuffle: shuffle within and across buckets (seeded by ``seed`` and the epoch); False keeps
            index order within buckets and buckets in order (validation).
        drop_last: drop each bucket's incomplete last batch.
        seed: shuffle seed (the same on every rank).
        sampler: set by Lightning under DDP (a ``DistributedSampler``): its ``num_replicas`` and ``rank``
            are used; its order and epoch are not.
        num_replicas, rank: the split across ranks when ``sampler`` does not give it (default 1, 0).
        position: a saved ``position_state`` to resume from: the first epoch iterated is
            ``position["epoch"]`` and starts after ``position["batches_done"]`` batches of this rank
            (the next epoch when that one was complete). Given at construction so that it survives
            Lightning re-creating the sampler for DDP.
        dataset: told the epoch (``set_epoch``) when an iteration starts, before worker processes copy it.

    The sampler counts its own epochs (each iteration is the next one): Lightning's epoch number is
    not the order's, since a run stopped by ``max_steps`` mid-epoch resumes in Lightning's next epoch.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        sampler: Sampler | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        position: dict | None = None,
        dataset: Dataset | None = None,
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), bool(shuffle), bool(drop_last)
        self.seed = int(seed)
        has_split = sampler is not None and hasattr(sampler, "num_replicas") and hasattr(sampler, "rank")
        self.num_replicas = int(sampler.num_replicas if has_split else num_replicas or 1)
        self.rank = int(sampler.rank if has_split else rank or 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} out of range for {self.num_replicas} replicas")
        self.sampler, self.dataset = sampler, dataset
        self.epoch = 0  # the epoch the next iteration yields
        self.current_epoch: int | None = None  # the epoch being iterated
        self._skip = 0
        if position is not None:
            self._load_position(position)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield ``epoch`` (from its start)."""
        self.epoch, self._skip = int(epoch), 0

    # -- epoch order ---------------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch``, in order (before the split across ranks)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in np.unique(self.bucket_ids):
            members = np.flatnonzero(self.bucket_ids == bucket)
            if self.shuffle:
                members = rng.permutation(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def _rank_count(self, n_batches: int) -> int:
        """Batches per rank: the leftover batches are dropped in training (ranks stay disjoint) and
        repeated in evaluation (every item is seen); a rank never gets none (Lightning would fail)."""
        if self.shuffle and n_batches >= self.num_replicas:
            return n_batches // self.num_replicas
        return -(-n_batches // self.num_replicas)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        batches = self.global_batches(epoch)
        needed = self._rank_count(len(batches)) * self.num_replicas
        batches = [batches[k % len(batches)] for k in range(needed)] if batches else []
        return batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        """Batches of this rank per epoch (the same every epoch)."""
        counts = np.unique(self.bucket_ids, return_counts=True)[1]
        per_bucket = counts // self.batch_size if self.drop_last else -(-counts // self.batch_size)
        return self._rank_count(int(per_bucket.sum()))

    def __iter__(self) -> Iterator[list[int]]:
        if self.dataset is not None:  # now: DataLoader workers copy the dataset before the first next()
            set_dataset_epoch(self.dataset, self.epoch)
        return self._batches()

    def _batches(self) -> Iterator[list[int]]:
        epoch, skip = self.epoch, self._skip  # read at the first next(), not when iter() is called
        self.current_epoch, self.epoch, self._skip = epoch, epoch + 1, 0
        yield from self.rank_batches(epoch)[skip:]

    # -- resume --------------------------------------------------------------------------------------
    def position_state(self, epoch: int, batches_done: int) -> dict:
        """What ``position`` takes: ``batches_done`` batches of this rank done in ``epoch``."""
        return {"epoch": int(epoch), "batches_done": int(batches_done), "num_replicas": self.num_replicas}

    def _load_position(self, position: dict) -> None:
        epoch = int(position["epoch"])
        # with a different number of ranks, keep the global position (rounded down)
        done = int(position["batches_done"]) * int(position.get("num_replicas", 1)) // self.num_replicas
        if done >= len(self):
            epoch, done = epoch + 1, 0
        self.epoch, self._skip = epoch, done


def trainer_position(trainer) -> dict:
    """What a datamodule whose training loader is bucket-batched saves in checkpoints: {"bucket_position":
    the sampler's epoch and the batches this rank has processed in it} (counted by the trainer, which knows
    what was consumed; the loader has prefetched ahead); {} for any other loader. Resumed by giving
    ``state["bucket_position"]`` as ``position`` to the next ``BucketBatchSampler``."""
    loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, BucketBatchSampler) or sampler.current_epoch is None:
        return {}
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return {"bucket_position": sampler.position_state(sampler.current_epoch, done)}


class BucketLoader(DataLoader):
    """A training DataLoader over a :class:`BucketBatchSampler`. Its mid-epoch position travels in the
    datamodule's state (:func:`trainer_position`), so a resumed run continues at the next batch; the
    ``state_dict`` / ``load_state_dict`` pair says so to Lightning, which otherwise warns that resuming
    mid-epoch is unreliable."""

    def state_dict(self) -> dict:
        return {"position": "in the datamodule state"}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore here (the datamodule's ``load_state_dict`` did)."""
