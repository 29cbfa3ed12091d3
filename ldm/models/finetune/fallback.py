"""The tiny random base a fine-tune uses under ``trainer.fast_dev_run`` when no base model exists: a plumbing
check (its results mean nothing), built from the tiny UNet preset (``ldm.modules.tiny_unet``, =
``model/unet=tiny``) and the same tiny VAE / text encoder as ``model/vae=tiny``, ``model/text_encoder=tiny``
so every method attaches to a real UNet / VAE / CLIP layout. ``family="sdxl"`` (the ``*_sdxl`` presets): the
SDXL layout at test size instead, = ``model/unet=sdxl_tiny`` + ``model/conditioner=sdxl_tiny`` (two text
encoders, the second pooled, three size embedders, the UNet's label embedding)."""

from __future__ import annotations

from ldm.diffusion import DiffusionSchedule
from ldm.io.components import SDComponents
from ldm.modules.conditioner import Conditioner, embedder
from ldm.modules.size_embedding import SizeEmbedding
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet
from ldm.modules.vae import AutoencoderKL

FAMILIES = ("sd", "sdxl")
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def tiny_sdxl_conditioner() -> Conditioner:
    """``model/conditioner=sdxl_tiny``: CLIP 32 wide + pooled CLIP 48 wide (pooled 40), 3 x 2 x 32 size
    features: context 80, vector 232."""
    text_options = {"layer": "penultimate", "final_layer_norm": False}
    clip_l = CLIPTextEncoder.tiny(hidden_size=32, seed=0, **text_options)
    clip_g = PooledCLIPTextEncoder.tiny(hidden_size=48, projection_dim=40, seed=1, **text_options)
    sizes = [embedder(SizeEmbedding(32), input_key=key, ucg_rate=0.0) for key in SIZE_KEYS]
    return Conditioner([embedder(clip_l), embedder(clip_g), *sizes], force_zeros_for_empty_prompt=True)


def tiny_random_base(resolution: int = 32, family: str = "sd") -> SDComponents:
    if family not in FAMILIES:
        raise ValueError(f"model.base_family must be one of {FAMILIES} or null, got {family!r}")
    sdxl = family == "sdxl"
    unet = (
        tiny_unet(
            num_heads=-1,
            num_head_channels=16,
            transformer_depth=[0, 1],
            transformer_depth_middle=1,
            context_dim=80,
            adm_in_channels=232,
            use_linear_in_transformer=True,
        )
        if sdxl
        else tiny_unet()
    )
    vae = AutoencoderKL(
        embed_dim=4,
        ch=8,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=resolution,
        norm_groups=4,
    )
    texts = tiny_sdxl_conditioner().text_embedders if sdxl else [CLIPTextEncoder.tiny()]
    return SDComponents(
        unet=unet,
        vae=vae.eval(),
        text_encoder=texts[0],
        text_encoder_2=texts[1] if sdxl else None,
        schedule=DiffusionSchedule.from_config("scaled_linear"),
        parameterization="eps",
        scale_factor=1.0,
        version="sdxl" if sdxl else "custom",
        resolution=resolution,
    )
