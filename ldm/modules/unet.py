"""The conditional UNet of Stable Diffusion v1 / v2 / XL (LDM / sgm ``openaimodel.UNetModel`` layout).

Module names match the original LDM and sgm code, so the ``model.diffusion_model.*`` weights of a
Stable Diffusion v1/v2/XL checkpoint load with ``strict=True`` after stripping the prefix.

``UNetModel.forward(x [B, C, H, W], timesteps [B], context [B, L, context_dim], y [B, adm_in_channels])
-> [B, C', H, W]``; ``y`` (SDXL's pooled text + size features) only when ``adm_in_channels`` is set.
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


def label_embedding(adm_in_channels: int, time_embed_dim: int) -> nn.Sequential:
    """sgm's ``label_emb`` for ``num_classes="sequential"``: ``label_emb.0.0`` Linear, SiLU, ``label_emb.0.2``
    Linear (diffusers' ``add_embedding.linear_1`` / ``linear_2``), mapping ``y`` onto the time embedding."""
    return nn.Sequential(
        nn.Sequential(
            nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
    )


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


def level_depths(
    transformer_depth: int | Sequence[int], transformer_depth_middle: int | None, levels: int
) -> tuple[list[int], int]:
    """(transformer blocks per level, in the middle block) from an int or a per-level list; the middle
    defaults to the deepest level's depth (sgm's rule). Raises on a wrong length or a middle of 0."""
    if isinstance(transformer_depth, int):
        depths = [transformer_depth] * levels
    else:
        depths = [int(d) for d in transformer_depth]
    if len(depths) != levels or min(depths) < 0:
        raise ValueError(
            f"transformer_depth {depths} must be one depth >= 0 per level of channel_mult ({levels} levels)"
        )
    middle = depths[-1] if transformer_depth_middle is None else int(transformer_depth_middle)
    if middle < 1:
        raise ValueError(
            f"the middle block needs a transformer depth >= 1, got {middle}: set transformer_depth_middle"
        )
    return depths, middle


def depth_kwargs(depths: Sequence[int], middle: int) -> dict[str, int | list[int]]:
    """Inverse of ``level_depths`` for levels with attention (depth > 0 where a level has one): one int
    ``transformer_depth`` when every transformer shares a depth (SD v1/v2), else the per-level list and,
    when it differs from the last level's, ``transformer_depth_middle``."""
    if len({d for d in depths if d} | {middle}) == 1:
        return {"transformer_depth": middle}
    out: dict[str, int | list[int]] = {"transformer_depth": list(depths)}
    if depths[-1] != middle:
        out["transformer_depth_middle"] = middle
    return out


class UNetModel(nn.Module):
    """Conditional UNet for latent diffusion (SD v1: defaults; SD 2.x: ``num_head_channels=64``,
    ``use_linear_in_transformer=True``, ``context_dim=1024``; SDXL: ``channel_mult=(1, 2, 4)``,
    ``transformer_depth=(0, 2, 10)``, ``context_dim=2048``, ``adm_in_channels=2816``).

    Args:
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsampling factors (1, 2, 4, ...) whose levels get a
            SpatialTransformer after each ResBlock (unless the level's transformer depth is 0).
        num_heads / num_head_channels: heads per attention layer; ``num_head_channels > 0``
            fixes the head width instead (heads = channels // num_head_channels).
        transformer_depth: transformer blocks per SpatialTransformer: one int, or one per level
            (0: no attention at that level); ``transformer_depth_middle``: the middle block's
            (default: the last level's).
        context_dim: width of the conditioning tokens (None: the attn2 layers self-attend).
        adm_in_channels: width of the vector condition ``y`` (SDXL: pooled text + size features);
            ``label_emb`` (Linear, SiLU, Linear) maps it onto the time embedding, which it is added to.
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
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = 768,
        use_linear_in_transformer: bool = False,
        use_checkpoint: bool = False,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        transformer_depth_middle: int | None = None,
        adm_in_channels: int | None = None,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        channel_mult = tuple(channel_mult)
        depths, middle_depth = level_depths(transformer_depth, transformer_depth_middle, len(channel_mult))
        attention = [
            2**level in tuple(attention_resolutions) and depths[level] > 0 for level in range(len(depths))
        ]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.adm_in_channels = adm_in_channels
        time_embed_dim = model_channels * 4

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, ch_out, use_scale_shift_norm, use_checkpoint)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            if num_head_channels > 0:
                heads, head_dim = ch // num_head_channels, num_head_channels
            else:
                heads, head_dim = num_heads, ch // num_heads
            return SpatialTransformer(
                ch, heads, head_dim, depth=depth, dropout=dropout, context_dim=context_dim,
                use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint,
            )  # fmt: skip

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.label_emb = None if adm_in_channels is None else label_embedding(adm_in_channels, time_embed_dim)

        # (width, transformer depth) per level; depth 0: no SpatialTransformer at that level
        levels = [(model_channels * m, d if a else 0) for m, d, a in zip(channel_mult, depths, attention)]
        skip_channels = self._build_down(
            in_channels, model_channels, levels, num_res_blocks, res_block, transformer
        )
        ch = skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), transformer(ch, middle_depth), res_block(ch, ch)
        )
        ch = self._build_up(ch, levels, num_res_blocks, skip_channels, res_block, transformer)
        self.out = nn.Sequential(_normalization(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def _build_down(
        self, in_channels, model_channels, levels, num_res_blocks, res_block, transformer
    ) -> list[int]:
        """``input_blocks``: conv_in, then per level ResBlocks (+ transformer) and a Downsample; returns the
        channels of every skip connection."""
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        for level, (width, depth) in enumerate(levels):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, width)]
                ch = width
                if depth:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(levels) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        return skip_channels

    def _build_up(self, ch, levels, num_res_blocks, skip_channels, res_block, transformer) -> int:
        """``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` ResBlocks on the concatenated
        skips (+ transformer), the last one ending in an Upsample; returns the final width."""
        self.output_blocks = nn.ModuleList()
        for level, (width, depth) in reversed(list(enumerate(levels))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [res_block(ch + skip_channels.pop(), width)]
                ch = width
                if depth:
                    layers.append(transformer(ch, depth))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlocks and transformer blocks during backward (when grad is enabled)."""
        for module in self.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.use_checkpoint = enabled

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, in_channels, H, W], timesteps [B] (or scalar), context [B, L, context_dim],
        y [B, adm_in_channels] (exactly when the UNet has a label embedding)."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None or y is not None:
            emb = emb + self._label(y, emb).to(emb.dtype)

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

    def _label(self, y: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
        """``label_emb(y)`` [B, time_embed_dim] (``y`` cast to the time embedding's dtype, as diffusers does),
        after checking that ``y`` fits this UNet."""
        batch = emb.shape[0]
        if self.label_emb is None:
            raise ValueError("this UNet has no label embedding (adm_in_channels is None); do not pass y")
        if y is None or tuple(y.shape) != (batch, self.adm_in_channels):
            got = None if y is None else list(y.shape)
            raise ValueError(
                f"this UNet adds a label embedding of y [B, adm_in_channels] = [{batch}, "
                f"{self.adm_in_channels}] to the time embedding (SDXL: pooled text + size features); got "
                f"y={got}"
            )
        return self.label_emb(y.to(emb.dtype))
