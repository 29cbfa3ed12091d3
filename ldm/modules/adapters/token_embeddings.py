"""Placeholder tokens for textual inversion (Gal et al. 2022, "An Image is Worth One Word").

A placeholder such as ``<shape-x>`` with ``num_vectors`` = n stands for n consecutive tokens
``<shape-x> <shape-x>_1 ... <shape-x>_{n-1}`` (the diffusers / AUTOMATIC1111 convention): prompts are
rewritten by :func:`expand_placeholders` before tokenising, and each of the n tokens has its own row in
the token embedding.

Training: :class:`PlaceholderEmbedding` replaces the text encoder's ``nn.Embedding``. It keeps the base
matrix frozen (the very same tensor, never in the optimiser, so every other row stays bit-identical,
weight decay included) and reads the placeholder rows from a separate trainable ``vectors`` parameter
``[n, dim]``. :meth:`PlaceholderEmbedding.merged` writes the vectors into a plain ``nn.Embedding``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PlaceholderEmbedding", "expand_placeholders", "initial_vectors", "placeholder_tokens"]


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """``("<x>", 3)`` -> ``["<x>", "<x>_1", "<x>_2"]``: the tokens a multi-vector placeholder expands to."""
    token = str(token).strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(
            f"placeholder token {token!r} must be one non-empty word without spaces, e.g. '<my-cat>'"
        )
    if int(num_vectors) < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    return [token] + [f"{token}_{i}" for i in range(1, int(num_vectors))]


def expand_placeholders(prompt: str, placeholders: Mapping[str, Sequence[str]]) -> str:
    """Replace each placeholder by its tokens joined by spaces (``"a <x> dog"`` -> ``"a <x> <x>_1 dog"``).

    ``placeholders``: token -> the tokens it expands to (see :func:`placeholder_tokens`). A token that is
    already followed by ``_<digit>`` (an expansion written out by hand) is left alone. Case-insensitive,
    as the CLIP tokenizer lower-cases text.
    """
    for token, expansion in placeholders.items():
        if len(expansion) <= 1:
            continue
        pattern = re.compile(re.escape(token) + r"(?!_\d)", flags=re.IGNORECASE)
        prompt = pattern.sub(" ".join(expansion).replace("\\", "\\\\"), prompt)
    return prompt


def initial_vectors(weight: Tensor, num_vectors: int, init_ids: Sequence[int] | None = None) -> Tensor:
    """Starting rows ``[num_vectors, dim]`` for a placeholder in the embedding ``weight`` ``[vocab, dim]``:
    the rows of ``init_ids`` (an initializer text's tokens) cycled over the vectors, as AUTOMATIC1111 does;
    without ``init_ids``, random rows drawn from N(mean, std) of the existing rows per dimension."""
    weight = weight.detach()
    if init_ids:
        rows = weight[torch.as_tensor(list(init_ids), device=weight.device)]
        return rows[torch.arange(num_vectors, device=weight.device) % len(rows)].clone()
    rows = weight.float()
    noise = torch.randn(num_vectors, weight.shape[1], device=weight.device)
    return (noise * rows.std(0) + rows.mean(0)).to(weight.dtype)


class PlaceholderEmbedding(nn.Embedding):
    """A token embedding whose rows ``token_ids`` come from the trainable parameter ``vectors`` [n, dim].

    ``weight`` is the base matrix (shared with ``base``, frozen); its rows for ``token_ids`` are left as they
    were (the initialisation), which is what the model sees while ``enabled`` is False (before/after grids).
    """

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int], init: Tensor | None = None):
        num, dim = base.weight.shape
        super().__init__(
            num,
            dim,
            padding_idx=base.padding_idx,
            _weight=base.weight.detach(),
            _freeze=True,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        ids = torch.as_tensor([int(i) for i in token_ids], dtype=torch.long)
        if ids.numel() == 0 or ids.unique().numel() != ids.numel() or ids.min() < 0 or ids.max() >= num:
            raise ValueError(
                f"token_ids must be distinct rows of the {num}-row embedding, got {ids.tolist()}"
            )
        start = self.weight[ids.to(self.weight.device)] if init is None else torch.as_tensor(init)
        if tuple(start.shape) != (ids.numel(), dim):
            raise ValueError(
                f"initial vectors have shape {tuple(start.shape)}, expected ({ids.numel()}, {dim})"
            )
        self.vectors = nn.Parameter(start.detach().to(self.weight.device, self.weight.dtype).clone())
        slot = torch.full((num,), -1, dtype=torch.long)
        slot[ids] = torch.arange(ids.numel())
        self.register_buffer("token_ids", ids, persistent=False)
        # vocab id -> row of vectors
        self.register_buffer("slot", slot.to(self.weight.device), persistent=False)
        self.enabled = True

    def forward(self, input_ids: Tensor) -> Tensor:
        out = F.embedding(input_ids, self.weight, self.padding_idx)
        if not self.enabled:
            return out
        slot = self.slot[input_ids]
        placeholder = self.vectors[slot.clamp(min=0)]
        return torch.where((slot >= 0).unsqueeze(-1), placeholder, out)

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` (frozen) with the trained vectors written into their rows."""
        weight = self.weight.detach().clone()
        weight[self.token_ids] = self.vectors.detach().to(weight.dtype)
        return nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, placeholders={self.token_ids.tolist()}, enabled={self.enabled}"
