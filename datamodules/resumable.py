"""A training DataLoader that resumes mid-epoch at the next batch.

The order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e`` (split across ranks
like :class:`~torch.utils.data.DistributedSampler`), so it never touches the global RNG and is the same
after a restart. Lightning saves the loader's :meth:`ResumableDataLoader.state_dict` in every checkpoint
(loaders with ``state_dict``/``load_state_dict`` are "stateful") and restores it before the first batch is
fetched; the number of batches the *training step consumed* is reported by the
:class:`callbacks.exact_resume.ExactResume` callback (Lightning prefetches, so counting fetched batches
would skip one).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.utils.logging import get_logger

log = get_logger(__name__)

__all__ = ["ResumableDataLoader", "ResumableSampler", "resumable_loader"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation (``seed + epoch``) that can start ``skip`` samples into an epoch.

    A :class:`DistributedSampler` subclass, so Lightning keeps it under DDP instead of wrapping it; with
    one process it is an ordinary shuffling sampler."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True):
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0  # samples of the current epoch already consumed (applies to the next iteration only)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # datasets with per-epoch choices (flip variants)
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position is part of Lightning checkpoints."""

    consumed_batches = 0  # batches of ``sampler.epoch`` the training step has seen (set by ExactResume)

    def mark_consumed(self, epoch: int, batches: int, epoch_length: int | float) -> None:
        """Record that the training step finished batch ``batches - 1`` of ``epoch``, an epoch of
        ``epoch_length`` batches (``len(self)`` or fewer with ``limit_train_batches``)."""
        if batches >= min(len(self), epoch_length):  # epoch over: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self._position = (int(epoch), int(batches))

    def state_dict(self) -> dict:
        sampler = self.sampler
        epoch, batches = getattr(self, "_position", (sampler.epoch, 0))
        return {"seed": int(sampler.seed), "epoch": epoch, "batches": batches,
                "num_samples": len(self.dataset), "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        sampler.seed = int(state["seed"])
        sampler.set_epoch(int(state["epoch"]))
        if state.get("num_samples") != len(self.dataset) or state.get("batch_size") != self.batch_size:
            log.warning(
                f"the training data changed since the checkpoint ({state.get('num_samples')} items in batches of "
                f"{state.get('batch_size')}, now {len(self.dataset)} in batches of {self.batch_size}): epoch "
                f"{state['epoch']} starts from its first batch instead of resuming at batch {state['batches']}"
            )
            return
        sampler.skip = int(state["batches"]) * self.batch_size
        self._position = (int(state["epoch"]), int(state["batches"]))


def resumable_loader(dataset: Dataset, batch_size: int, seed: int | None = None, **kwargs) -> ResumableDataLoader:
    """A shuffling training loader that resumes exactly. ``seed`` defaults to the process seed
    (``torch.initial_seed()``, set by ``seed_everything``); the loader draws worker seeds from its own
    generator, so creating it and iterating it leave the global RNG untouched."""
    seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
    generator = torch.Generator().manual_seed(seed)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=ResumableSampler(dataset, seed),
                               generator=generator, **kwargs)
