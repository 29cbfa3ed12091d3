"""The tiny random base a fine-tune uses under ``trainer.fast_dev_run`` when no base model exists: a plumbing
check (its results mean nothing), built from the tiny UNet preset (``ldm.modules.tiny_unet``, =
``model/unet=tiny``) and the same tiny VAE / text encoder as ``model/vae=tiny``, ``model/text_encoder=tiny``
so every method attaches to a real UNet / VAE / CLIP layout."""

from __future__ import annotations

from ldm.diffusion import DiffusionSchedule
from ldm.io.components import SDComponents
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet
from ldm.modules.vae import AutoencoderKL


def tiny_random_base(resolution: int = 32) -> SDComponents:
    unet = tiny_unet()
    vae = AutoencoderKL(
        embed_dim=4,
        ch=8,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=resolution,
        norm_groups=4,
    )
    return SDComponents(
        unet=unet,
        vae=vae.eval(),
        text_encoder=CLIPTextEncoder.tiny(),
        schedule=DiffusionSchedule.from_config("scaled_linear"),
        parameterization="eps",
        scale_factor=1.0,
        version="custom",
        resolution=resolution,
    )
