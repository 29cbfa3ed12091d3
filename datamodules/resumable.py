"""A training DataLoader that resumes mid-epoch at the next batch.

The order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e``, dealt to DDP ranks
(``datamodules/samplers.py``), so it never touches the global RNG and is the same after a restart.
Lightning saves the loader's :meth:`ResumableDataLoader.state_dict` in every checkpoint (loaders with
``state_dict``/``load_state_dict`` are "stateful") and restores it before the first batch is fetched;
the number of batches the *training step consumed* is reported by the
:class:`callbacks.exact_resume.ExactResume` callback (Lightning prefetches, so counting fetched batches
would skip one).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.samplers import ResumableSampler, training_sampler
from ldm.utils.logging import get_logger

log = get_logger(__name__)

__all__ = ["ResumableDataLoader", "ResumableSampler", "resumable_loader"]  # ResumableSampler: samplers.py


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position is part of Lightning checkpoints."""

    consumed_batches = 0  # batches of ``sampler.epoch`` the training step has seen (set by ExactResume)

    def mark_consumed(self, epoch: int, batches: int, epoch_length: float) -> None:
        """Record that the training step finished batch ``batches - 1`` of ``epoch``, an epoch of
        ``epoch_length`` batches (``len(self)`` or fewer with ``limit_train_batches``)."""
        if batches >= min(len(self), epoch_length):  # epoch over: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self._position = (int(epoch), int(batches))

    def state_dict(self) -> dict:
        sampler = self.sampler
        epoch, batches = getattr(self, "_position", (sampler.epoch, 0))
        return {
            "seed": int(sampler.seed),
            "epoch": epoch,
            "batches": batches,
            "num_samples": len(self.dataset),
            "batch_size": int(self.batch_size),
        }

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        sampler.seed = int(state["seed"])
        sampler.set_epoch(int(state["epoch"]))
        if state.get("num_samples") != len(self.dataset) or state.get("batch_size") != self.batch_size:
            log.warning(
                f"the training data changed since the checkpoint ({state.get('num_samples')} items in "
                f"batches of {state.get('batch_size')}, now {len(self.dataset)} in batches of "
                f"{self.batch_size}): epoch {state['epoch']} starts from its first batch instead of "
                f"resuming at batch {state['batches']}"
            )
            return
        sampler.skip = int(state["batches"]) * self.batch_size
        self._position = (int(state["epoch"]), int(state["batches"]))


def resumable_loader(dataset: Dataset, batch_size: int, seed: int = 0, **kwargs) -> ResumableDataLoader:
    """A shuffling training loader (order: ``datamodules.samplers.training_sampler``) that resumes exactly.
    It draws worker seeds from its own generator, so creating and iterating it leaves the global RNG alone."""
    generator = torch.Generator().manual_seed(int(seed))
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=training_sampler(dataset, seed), generator=generator, **kwargs
    )
