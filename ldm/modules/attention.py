"""Cross-attention transformer blocks of the Stable Diffusion UNet.

Module and parameter names follow the original LDM code (``ldm/modules/attention.py`` of
CompVis/latent-diffusion), so Stable Diffusion checkpoints load by prefix. Attention runs
through ``torch.nn.functional.scaled_dot_product_attention``.

Shapes: tokens are ``[B, N, C]``; the spatial transformer maps ``[B, C, H, W]`` to itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ContextTransform = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, M, context_dim].

    ``context=None`` makes it self-attention. ``to_q/to_k/to_v`` have no bias and ``to_out.0``
    has one, as in LDM; they stay plain ``nn.Linear`` so adapters (LoRA) can wrap them.

    ``context_transform``: optional callable ``context -> (context_k, context_v)`` applied to the
    inputs of ``to_k`` and ``to_v`` (AUTOMATIC1111-style hypernetworks). ``None`` means identity.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.context_transform: ContextTransform | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if self.context_transform is None:
            context_k = context_v = context
        else:
            context_k, context_v = self.context_transform(context)
        b, n, _ = x.shape
        # [B, L, heads*dim_head] -> [B, heads, L, dim_head] as strided views (no copy).
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(context_k).view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        v = self.to_v(context_v).view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one fused projection, split into value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU(dim, mult*dim), Dropout, Linear(mult*dim, dim)]`` (LDM's gated FF)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on ``context``, gated feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: ``[B, C, H, W] -> [B, C, H, W]``.

    GroupNorm, ``proj_in`` to ``n_heads * d_head`` channels (1x1 conv for SD v1, linear on
    tokens for SD 2.x when ``use_linear``), ``depth`` transformer blocks, zero-initialised
    ``proj_out`` back to ``in_channels``, plus the residual input.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, use_checkpoint)
            for _ in range(depth)
        )
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # [B, HW, C]
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        out = tokens.view(b, h, w, -1).permute(0, 3, 1, 2)  # channels-last view, no copy
        if not self.use_linear:
            out = self.proj_out(out)
        return x + out
