"""A tiny random SDXL base pipeline (diffusers), saved as a folder, for the SDXL file tests: two tiny CLIPs
of widths 32 and 48 (the second with a 40-wide projection), a text-time UNet, a VAE with SDXL's scale
0.13025 and SDXL's released scheduler (EulerDiscrete, leading, offset 1). Every weight is perturbed so that
zero-initialised layers cannot hide a wrong mapping."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.modules.tiny_clip import tiny_clip_model, tiny_clip_tokenizer
from tests.interop_parts import close, image, perturb

WIDTH_L, WIDTH_G, POOLED, TIME_DIM, LENGTH = 32, 48, 40, 8, 20
PROMPTS = ["a red circle on a blue background", "a green triangle"]
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "num_train_timesteps": 1000,
}


def tiny_xl_unet_vae(cross_attention_dim: int, time_ids: int):
    """The tiny diffusers UNet in SDXL's layout (no attention at the first level, 2 transformer blocks
    below, linear projections, a ``text_time`` label of the pooled vector + ``time_ids`` size / score
    numbers) and VAE (scale 0.13025), seeded and perturbed as every SDXL parity test uses them: (unet, vae),
    in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(0, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + time_ids * TIME_DIM,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=0.13025,
    )
    return perturb(unet, 3).eval(), perturb(vae, 2).eval()


def tiny_xl_pipeline(folder: Path | None = None):
    """A tiny ``StableDiffusionXLPipeline``, returned (and saved to ``folder`` with ``save_pretrained``)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, _ = tiny_clip_tokenizer(None, LENGTH)
    text_l = perturb(tiny_clip_model(tokenizer, WIDTH_L, 2, 4, LENGTH, seed=0), 11, 0.02).eval()
    text_g = perturb(
        tiny_clip_model(tokenizer, WIDTH_G, 2, 4, LENGTH, seed=1, projection_dim=POOLED), 12, 0.02
    ).eval()
    unet, vae = tiny_xl_unet_vae(WIDTH_L + WIDTH_G, time_ids=6)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_l,
        text_encoder_2=text_g,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def size_batch(prompts, original=(16, 16), crop=(0, 0), target=(16, 16)) -> dict:
    n = len(prompts)
    return {
        "caption": list(prompts),
        "original_size_as_tuple": torch.tensor([original] * n),
        "crop_coords_top_left": torch.tensor([crop] * n),
        "target_size_as_tuple": torch.tensor([target] * n),
    }


def unet_xl_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 700])[:batch],
        torch.randn(batch, LENGTH, WIDTH_L + WIDTH_G, generator=g),
        torch.randn(batch, POOLED + 6 * TIME_DIM, generator=g),
    )


def assert_same_xl_outputs(components, pipe, atol: float = 1e-5) -> None:
    """Our SDXL components against a diffusers SDXL pipeline's modules: UNet (context + vector), VAE
    posterior mean and decode, the conditioner's context and pooled vector against ``encode_prompt``."""
    x, t, context, y = unet_xl_inputs()
    with torch.no_grad():
        # diffusers splits y into text_embeds (pooled) and the time ids' Fourier features: give it the same y
        theirs = pipe.unet(
            x,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": y[:, :POOLED], "time_ids": torch.zeros(len(x), 6)},
        ).sample
        proj = pipe.unet.add_time_proj(torch.zeros(len(x) * 6)).reshape(len(x), -1)
        y_theirs = torch.cat([y[:, :POOLED], proj], dim=-1)
        close(components.unet(x, t, context, y=y_theirs), theirs, atol)
        img = image()
        mean = components.vae.encode(img).mean
        close(mean, pipe.vae.encode(img).latent_dist.mean, atol)
        close(components.vae.decode(mean), pipe.vae.decode(mean).sample, atol)
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        ours = components.conditioner()(size_batch(PROMPTS), use_cache=False)
        close(ours["crossattn"], context, atol)
        close(ours["vector"][:, :POOLED], pooled, atol)
        assert ours["vector"].shape[-1] == POOLED + 6 * TIME_DIM
