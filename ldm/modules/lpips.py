"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"),
VGG16 variant. Nothing is downloaded: weights come from local files the user provides.

- ``vgg_path``: a torchvision ``vgg16`` state dict (keys ``features.{i}.weight``; extra keys are ignored).
- ``lin_path``: the ``lpips`` package's ``weights/v0.1/vgg.pth`` (keys ``lin{k}.model.1.weight``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's numbering
_TAP_WIDTHS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, v, 3, padding=1), nn.ReLU(inplace=False)]
            width = v
    return nn.Sequential(*layers)


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """d(x, y) [B] for images in [-1, 1]. Frozen; build with :meth:`from_files`."""

    def __init__(self):
        super().__init__()
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        for k, width in enumerate(_TAP_WIDTHS):
            setattr(self, f"lin{k}", _Lin(width))
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        model = cls()
        for path in (vgg_path, lin_path):
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"LPIPS weight file not found: {path}. LPIPS needs local weights (nothing is "
                    "downloaded): set model.lpips.vgg_path to a torchvision vgg16 state dict and "
                    "model.lpips.lin_path to the lpips package's weights/v0.1/vgg.pth, or set "
                    "model.perceptual_weight=0."
                )
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        vgg = {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")}
        model.features.load_state_dict(vgg, strict=True)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(lin, strict=False)
        missing = [k for k in missing if k.startswith("lin")]
        if missing or unexpected:
            raise ValueError(
                f"{lin_path} is not an LPIPS vgg lin file: missing {missing}, unexpected {unexpected}"
            )
        return model

    def train(self, mode: bool = True) -> LPIPS:  # always frozen in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([(x - self.shift) / self.scale, (y - self.shift) / self.scale])
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                fx, fy = h.chunk(2)
                diff = (F.normalize(fx, dim=1, eps=1e-10) - F.normalize(fy, dim=1, eps=1e-10)).pow(2)
                total = total + getattr(self, f"lin{tap}").model(diff).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(_TAPS):
                    break
        return total
