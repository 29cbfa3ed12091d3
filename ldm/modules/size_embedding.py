"""SDXL's micro-conditioning features: Fourier (sinusoidal) embeddings of size numbers.

SDXL conditions on six numbers per image: original (height, width), crop (top, left) and target
(height, width). Each number gets the same sinusoidal embedding as a timestep, 256 wide, and the
six are concatenated (6 x 256 = 1536); with the pooled text vector (1280) that is the UNet's
``y`` (``adm_in_channels`` 2816). sgm calls this ``ConcatTimestepEmbedderND`` (one per pair of
numbers, concatenated by the conditioner); diffusers ``add_time_proj`` on the flattened ``time_ids``.
As a conditioner embedder (``conf/model/conditioner/sdxl.yaml``), one ``SizeEmbedding`` per batch key, in
sgm's order and names: ``original_size_as_tuple`` (H, W), ``crop_coords_top_left`` (top, left),
``target_size_as_tuple`` (H, W), each ``[B, 2]`` -> ``[B, 512]``.
The refiner uses five numbers (original size, crop, aesthetic score): 5 x 256 + 1280 = 2560.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.modules.unet import timestep_embedding

__all__ = ["SizeEmbedding", "size_embedding"]


def size_embedding(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """``[B, N]`` numbers -> ``[B, N * dim]`` float32 features: ``timestep_embedding(value, dim)`` of each
    number (``[cos, sin]`` halves), concatenated in order along the feature axis."""
    if values.ndim != 2:
        raise ValueError(f"size values must be [batch, numbers], got shape {list(values.shape)}")
    batch = values.shape[0]
    return timestep_embedding(values.reshape(-1), dim).reshape(batch, -1)


class SizeEmbedding(nn.Module):
    """``size_embedding`` as a module without parameters: ``[B, N] -> [B, N * dim]``."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.dim = dim

    def forward(self, values) -> torch.Tensor:
        """``values``: ``[B, N]`` numbers (a tensor, or a list of B tuples: a batch's
        ``original_size_as_tuple``)."""
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor([list(map(float, v)) for v in values])
        return size_embedding(values.float(), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
