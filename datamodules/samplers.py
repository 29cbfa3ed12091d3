"""The training order: one seeded permutation per epoch, dealt to DDP ranks in turn.

``DistributedSampler`` is what Lightning puts under every training loader under DDP (always shuffled, seed
0). Using the same sampler in a single process (one replica) makes the single-process order the DDP order
before it is dealt, so DDP with per-rank batch B sees, batch for batch, the items one process with batch
B x world size sees (``ldm.utils.batch_random`` gives them the same noise). Lightning calls ``set_epoch``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def world() -> tuple[int, int]:
    """(world size, rank): (1, 0) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def training_sampler(dataset: Dataset, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
    """Shuffled per epoch (``seed + epoch``); split across ranks when a process group is running; can start
    mid-epoch (:class:`ResumableSampler`; ``datamodules.resumable.resumable_loader`` keeps its position in
    checkpoints)."""
    return ResumableSampler(dataset, seed=seed, drop_last=drop_last)


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation (``seed + epoch``) that can start ``skip`` samples into an epoch.

    A :class:`DistributedSampler` subclass, so Lightning keeps it under DDP instead of wrapping it; with
    one process it is an ordinary shuffling sampler."""

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        replicas, rank = world()
        super().__init__(
            dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.skip = 0  # samples of the current epoch already consumed (applies to the next iteration only)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)
        set_dataset_epoch(self.dataset, epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def set_dataset_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell ``dataset`` and every dataset it wraps (``datasets`` of a ``ConcatDataset``, ``dataset`` of a
    ``Subset``, ``source`` of the project's wrappers) the epoch: those with per-epoch random choices
    (augmentations, flip variants, caption templates) draw them from (epoch, index), not the global RNG."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(int(epoch))
    inner = list(getattr(dataset, "datasets", None) or [])
    inner += [
        getattr(dataset, name)
        for name in ("dataset", "source")
        if isinstance(getattr(dataset, name, None), Dataset)
    ]
    for part in inner:
        set_dataset_epoch(part, epoch)
