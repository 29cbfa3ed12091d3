"""The conditional UNet of Stable Diffusion v1 / v2 (LDM ``openaimodel.UNetModel`` layout).

Module names match the original LDM code, so the ``model.diffusion_model.*`` weights of a
Stable Diffusion v1/v2 checkpoint load with ``strict=True`` after stripping the prefix.

``UNetModel.forward(x [B, C, H, W], timesteps [B], context [B, L, context_dim]) -> [B, C', H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B] (Vaswani et al. 2017).

    ``emb = [cos(t * f_i), sin(t * f_i)]`` with ``f_i = exp(-log(max_period) * i / half)``,
    ``i = 0 .. half-1``, ``half = dim // 2``; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _normalization(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding ``emb`` [B, emb_channels].

    ``h = conv(SiLU(GN(x))); h = h + Linear(SiLU(emb)); h = conv0(dropout(SiLU(GN(h))))``,
    or with ``use_scale_shift_norm`` ``GN(h) * (1 + scale) + shift`` (FiLM) instead of the add.
    Returns ``skip_connection(x) + h``; the last conv is zero-initialised.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            _normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            _normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv: ``[B, C, H, W] -> [B, C_out, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling (or to ``output_size`` for odd skip sizes), then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to ResBlocks, ``context`` to SpatialTransformers and
    ``output_size`` to Upsample layers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        output_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Conditional UNet for latent diffusion (SD v1: defaults; SD 2.x: ``num_head_channels=64``,
    ``use_linear_in_transformer=True``, ``context_dim=1024``).

    Args:
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsampling factors (1, 2, 4, ...) whose levels get a
            SpatialTransformer after each ResBlock.
        num_heads / num_head_channels: heads per attention layer; ``num_head_channels > 0``
            fixes the head width instead (heads = channels // num_head_channels).
        context_dim: width of the conditioning tokens (None: the attn2 layers self-attend).
        use_checkpoint: recompute ResBlocks and transformer blocks in backward (saves memory).

    H and W need not be multiples of ``2**(len(channel_mult)-1)``: upsampling matches the skips.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int = 8,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        context_dim: int | None = 768,
        use_linear_in_transformer: bool = False,
        use_checkpoint: bool = False,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        time_embed_dim = model_channels * 4

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, ch_out, use_scale_shift_norm, use_checkpoint)

        def transformer(ch: int) -> SpatialTransformer:
            if num_head_channels > 0:
                heads, head_dim = ch // num_head_channels, num_head_channels
            else:
                heads, head_dim = num_heads, ch // num_heads
            return SpatialTransformer(
                ch, heads, head_dim, depth=transformer_depth, dropout=dropout, context_dim=context_dim,
                use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint,
            )  # fmt: skip

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), transformer(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_normalization(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlocks and transformer blocks during backward (when grad is enabled)."""
        for module in self.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.use_checkpoint = enabled

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, in_channels, H, W], timesteps [B] (or scalar), context [B, L, context_dim]."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # An Upsample at the end of this block must reach the size of the next skip.
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
