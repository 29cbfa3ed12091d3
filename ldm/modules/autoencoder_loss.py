"""Losses of the KL autoencoder: reconstruction + KL, optional LPIPS and a PatchGAN hinge loss with
LDM's adaptive generator weight (Esser et al. 2021, "Taming Transformers", eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.modules.distributions import DiagonalGaussian


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-sample reconstruction error summed over C, H, W: [B] (LDM's convention: sum, then mean over
    batch)."""
    if kind == "l1":
        err = (x - x_rec).abs()
    elif kind in ("l2", "mse"):
        err = (x - x_rec).pow(2)
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; use 'l1' or 'mse'")
    return err.flatten(1).sum(1)


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """Mean over the batch of KL(q(z|x) || N(0, I)), each summed over the latent."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4) at the decoder's last layer L, clamped, no gradient."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
