"""The resumable training loader: seeded per-epoch order, restart at the next batch, data changes
tolerated."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from datamodules.resumable import resumable_loader


def batches(loader) -> list[list[int]]:
    return [b[0].tolist() for b in loader]


def test_order_is_seeded_per_epoch_and_leaves_the_global_rng_alone():
    data = TensorDataset(torch.arange(10))
    loader = resumable_loader(data, 3, seed=5)
    state = torch.get_rng_state()
    first = batches(loader)
    loader.sampler.set_epoch(1)
    second = batches(loader)
    assert torch.equal(state, torch.get_rng_state())
    assert first != second and sorted(i for batch in first for i in batch) == list(range(10))
    loader.sampler.set_epoch(0)
    assert batches(resumable_loader(data, 3, seed=5)) == first


def test_resumes_at_the_next_batch():
    data = TensorDataset(torch.arange(10))
    loader = resumable_loader(data, 3, seed=5)
    loader.sampler.set_epoch(2)
    full = batches(loader)
    loader.mark_consumed(2, 2, epoch_length=4)
    resumed = resumable_loader(data, 3, seed=99)  # the seed comes from the state
    resumed.load_state_dict(loader.state_dict())
    assert batches(resumed) == full[2:]
    assert batches(resumed) == full  # the skip applies once; the next pass is the whole epoch


def test_end_of_epoch_moves_to_the_next_and_changed_data_restarts_the_epoch(caplog):
    data = TensorDataset(torch.arange(10))
    loader = resumable_loader(data, 3, seed=5)
    loader.mark_consumed(0, 2, epoch_length=2)  # limit_train_batches=2: epoch 0 is over
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 0
    loader.mark_consumed(1, 1, epoch_length=4)
    bigger = resumable_loader(TensorDataset(torch.arange(12)), 3, seed=5)
    with caplog.at_level("WARNING"):
        bigger.load_state_dict(loader.state_dict())
    assert "training data changed" in caplog.text
    assert sum(len(batch) for batch in batches(bigger)) == 12
