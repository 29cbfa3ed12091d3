"""The VAE's diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar)))."""

from __future__ import annotations

import torch


class DiagonalGaussian:
    """Built from moments [B, 2c, h, w] (mean and log-variance stacked on the channel axis)."""

    def __init__(self, moments: torch.Tensor, logvar_range: tuple[float, float] = (-30.0, 20.0)):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(*logvar_range)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterisation trick (Kingma & Welling 2014): z = mean + std * eps, eps ~ N(0, I)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample [B], closed form -0.5 * sum(1 + logvar - mean^2 - exp(logvar))."""
        return -0.5 * torch.sum(1.0 + self.logvar - self.mean.pow(2) - self.logvar.exp(), dim=(1, 2, 3))
