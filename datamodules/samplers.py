"""The training order: one seeded permutation per epoch, dealt to DDP ranks in turn.

``DistributedSampler`` is what Lightning puts under every training loader under DDP (always shuffled, seed
0). Using the same sampler in a single process (one replica) makes the single-process order the DDP order
before it is dealt, so DDP with per-rank batch B sees, batch for batch, the items one process with batch
B x world size sees (``ldm.utils.batch_random`` gives them the same noise). Lightning calls ``set_epoch``.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def training_sampler(dataset: Dataset, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
    """Shuffled per epoch (``seed + epoch``); split across ranks when a process group is running."""
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                              drop_last=drop_last)
