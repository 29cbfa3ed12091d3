"""Low-rank factors of a weight difference by truncated SVD (Eckart-Young: the best rank-r approximation in
the Frobenius norm), what kohya's ``resize_lora.py`` and ``extract_lora_from_models.py`` compute.

A delta ``D`` [out, in(, kh, kw)] is flattened to [out, in*kh*kw], ``D = U S V^T``; rank r keeps
``up = U_r sqrt(S_r)`` [out, r(, 1, 1)] and ``down = sqrt(S_r) V_r^T`` [r, in(, kh, kw)] (``up @ down`` with
scale 1, i.e. ``alpha = r``), and the fraction of ``||D||_F^2`` kept is ``sum(S_r^2) / sum(S^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NUMERICAL_ZERO", "LowRank", "choose_rank", "low_rank_factors", "singular_values"]

#: Singular values below this fraction of the largest are float round-off: never kept.
NUMERICAL_ZERO = 1e-6


@dataclass
class LowRank:
    """``up`` [out, r(, 1, 1)], ``down`` [r, in(, kh, kw)], the rank and the kept fraction of
    ``||D||_F^2``."""

    down: torch.Tensor
    up: torch.Tensor
    rank: int
    kept: float


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of ``delta`` flattened to [out, in*kh*kw] (float32, descending)."""
    return torch.linalg.svdvals(delta.float().flatten(1))


def choose_rank(values: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """``rank`` (at most the number of values), or the smallest rank keeping ``energy`` (0 < energy <= 1) of
    the squared singular values' sum; both given: the smaller of the two; never past the numerical rank
    (values above ``NUMERICAL_ZERO`` of the largest); at least 1."""
    if rank is None and energy is None:
        raise ValueError("give a rank and/or an energy ratio to keep")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    numerical = int((values > values[0] * NUMERICAL_ZERO).sum()) if len(values) else 0
    limit = numerical if rank is None else min(int(rank), numerical)
    if energy is not None:
        squares = values.double() ** 2
        total = float(squares.sum())
        if total > 0:
            fraction = torch.cumsum(squares, 0) / total
            limit = min(limit, int((fraction < energy - 1e-12).sum()) + 1)
    return max(1, limit)


def low_rank_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """The truncated-SVD factors of ``delta`` at ``rank`` or at the ``energy`` to keep (``choose_rank``)."""
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    total = float((s.double() ** 2).sum())
    kept = float((s[:r].double() ** 2).sum()) / total if total > 0 else 1.0
    if delta.ndim == 4:
        up, down = up[:, :, None, None], down.reshape(r, *delta.shape[1:])
    return LowRank(down.contiguous(), up.contiguous(), r, kept)
