"""Random draws for one process's share of a data-parallel batch, made exactly as one process holding the
whole batch would make them, and independent of whatever else consumed random numbers before.

Under DDP, ``DistributedSampler`` deals items to ranks in turn (rank r gets global items r, r + W, r + 2W...),
so rank r's j-th item is item ``j * W + r`` of the global batch. Drawing the global tensor ``[B * W, ...]``
and keeping rows ``r::W`` gives each item the noise, timestep and dropout it would get in a single process
with batch ``B * W``: DDP with per-rank batch B then reproduces that run (up to the order of floating-point
sums in the gradient all-reduce). With a ``generator`` seeded from (run seed, batch counter) the draws of a
batch depend on nothing else, so every rank, and a resumed run, draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class BatchRandom:
    def __init__(self, rank: int = 0, world_size: int = 1, generator: torch.Generator | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.generator = rank, world_size, generator

    @classmethod
    def for_batch(cls, seed: int, batch_index: int, rank: int = 0, world_size: int = 1) -> BatchRandom:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + batch_index) % (2**63))
        return cls(rank, world_size, generator)

    def _share(
        self, draw: Callable[[tuple[int, ...]], torch.Tensor], shape: Sequence[int], device
    ) -> torch.Tensor:
        shape = tuple(shape)
        if self.world_size > 1:
            shape = (shape[0] * self.world_size, *shape[1:])
        values = draw(shape)[self.rank :: self.world_size]
        return values.to(device) if device is not None else values

    def _device(self, device):  # a generator draws on its own device (CPU); the result is moved after
        return self.generator.device if self.generator is not None else device

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        where = self._device(device)
        return self._share(
            lambda s: torch.randn(s, generator=self.generator, device=where, dtype=dtype), shape, device
        )

    def rand(self, shape: Sequence[int], device=None) -> torch.Tensor:
        where = self._device(device)
        return self._share(lambda s: torch.rand(s, generator=self.generator, device=where), shape, device)

    def randint(self, high: int, shape: Sequence[int], device=None) -> torch.Tensor:
        where = self._device(device)
        return self._share(
            lambda s: torch.randint(0, high, s, generator=self.generator, device=where), shape, device
        )
