"""SDXL conditioning and sampling against diffusers, on a tiny random ``StableDiffusionXLPipeline`` built
here.

Our two text embedders (CLIP-L penultimate; bigG penultimate + pooled, projected) reproduce the pipeline's
``encode_prompt``; our conditioner's vector (pooled + size features) its ``add_text_embeds`` +
``add_time_ids``; and our samplers over the same weights (the UNet renamed by ``ldm.io.diffusers_names``, the
VAE by its mapping, the text encoders shared in the HF layout) reach the pipeline's final latents from the
same initial latents.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.diffusion import build_sampler
from ldm.io.describe import build_schedule
from ldm.io.diffusers_config import (
    schedule_from_diffusers,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
)
from ldm.io.diffusers_names import diffusers_unet_to_ldm, diffusers_vae_to_ldm
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.conditioner import Conditioner, embedder
from ldm.modules.size_embedding import SizeEmbedding
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from tests.sdxl_parts import (
    LENGTH,
    POOLED,
    SCHEDULER,
    TIME_DIM,
    WIDTH_G,
    WIDTH_L,
    size_batch,
    tiny_xl_pipeline,
)

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on a blue background", "a green triangle on a white background"]
STEPS, GUIDANCE = 8, 5.0


def size_embedder(key: str) -> torch.nn.Module:
    return embedder(SizeEmbedding(TIME_DIM), input_key=key, ucg_rate=0.0)


def our_conditioner(text_l, text_g, tokenizer, force_zeros: bool = True) -> Conditioner:
    clip_l = CLIPTextEncoder(text_l, tokenizer, layer="penultimate", final_layer_norm=False)
    clip_g = PooledCLIPTextEncoder(text_g, tokenizer, layer="penultimate", final_layer_norm=False)
    return Conditioner(
        [
            embedder(clip_l),
            embedder(clip_g),
            size_embedder("original_size_as_tuple"),
            size_embedder("crop_coords_top_left"),
            size_embedder("target_size_as_tuple"),
        ],
        force_zeros_for_empty_prompt=force_zeros,
    )


@pytest.fixture(scope="module")
def tiny_xl():
    """(diffusers pipeline, our LatentDiffusion) over the same weights."""
    pipe = tiny_xl_pipeline()
    unet, vae = pipe.unet, pipe.vae

    ours_unet = UNetModel(**unet_config_from_diffusers(unet.config))
    ours_unet.load_state_dict(diffusers_unet_to_ldm(unet.state_dict(), unet.config), strict=True)
    ours_vae = AutoencoderKL(**vae_config_from_diffusers(vae.config))
    ours_vae.load_state_dict(diffusers_vae_to_ldm(vae.state_dict()), strict=True)
    schedule_config, parameterization = schedule_from_diffusers(pipe.scheduler.config)
    model = LatentDiffusion(
        unet=ours_unet,
        vae=ours_vae,
        conditioner=our_conditioner(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer),
        schedule=build_schedule(schedule_config),
        sampler=build_sampler("euler", steps=STEPS),
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        parameterization=parameterization,
        scale_factor=vae.config.scaling_factor,
        ema_decay=None,
        guidance_scale=GUIDANCE,
    ).eval()
    model._vae_loaded = True
    return pipe, model


def test_text_embedders_match_encode_prompt(tiny_xl):
    pipe, model = tiny_xl
    context, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=["a blue square", "a black star on a yellow background"],
    )
    ours = model.conditions(size_batch(PROMPTS))
    assert ours["crossattn"].shape == (2, LENGTH, WIDTH_L + WIDTH_G) == context.shape
    assert (ours["crossattn"] - context).abs().max().item() <= 1e-6
    assert (ours["vector"][:, :POOLED] - pooled).abs().max().item() <= 1e-6
    theirs_negative = model.conditions(
        size_batch(["a blue square", "a black star on a yellow background"]), zero_empty=True
    )
    assert (theirs_negative["crossattn"] - negative).abs().max().item() <= 1e-6
    assert (theirs_negative["vector"][:, :POOLED] - negative_pooled).abs().max().item() <= 1e-6
    # the penultimate layer without final LN differs from the last hidden state (the option matters)
    last = pipe.text_encoder(model.conditioner.embedders[0].tokenize(PROMPTS)).last_hidden_state
    assert (ours["crossattn"][..., :WIDTH_L] - last).abs().max() > 1e-2


def test_empty_negative_prompt_is_zeros_like_the_pipeline(tiny_xl):
    pipe, model = tiny_xl
    _, negative, _, negative_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=None
    )
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0  # force_zeros_for_empty_prompt
    uncond = model.conditions(size_batch(["", ""], original=(64, 48)), zero_empty=True)
    assert uncond["crossattn"].abs().max() == 0 and uncond["vector"][:, :POOLED].abs().max() == 0
    sizes = model.conditions(size_batch(PROMPTS, original=(64, 48)))["vector"][:, POOLED:]
    assert torch.equal(uncond["vector"][:, POOLED:], sizes) and sizes.abs().max() > 0  # the same size numbers
    # without the flag (or outside the unconditional branch) "" is encoded
    assert model.conditions(size_batch(["", ""]))["crossattn"].abs().max() > 0


def test_vector_matches_add_text_embeds_and_time_ids(tiny_xl):
    pipe, model = tiny_xl
    original, crop, target = (48, 40), (8, 4), (16, 24)
    vector = model.conditions(size_batch(PROMPTS, original, crop, target))["vector"]
    _, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(
        original, crop, target, dtype=torch.float32, text_encoder_projection_dim=POOLED
    ).repeat(2, 1)
    theirs = torch.cat([pooled, pipe.unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    assert vector.shape == (2, pipe.unet.config.projection_class_embeddings_input_dim)
    assert (vector - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "name,scheduler",
    [
        ("euler", "EulerDiscreteScheduler"),
        ("ddim", "DDIMScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ],
)
@pytest.mark.parametrize("negative", ["", "a blue square"])
def test_sampler_matches_sdxl_pipeline(tiny_xl, name, scheduler, negative):
    pipe, model = tiny_xl
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    pipe.scheduler = getattr(diffusers, scheduler).from_config({**SCHEDULER, "clip_sample": False})
    expected = pipe(
        PROMPTS,
        negative_prompt=None if negative == "" else [negative] * 2,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=latents.clone(),
        height=16,
        width=16,
        original_size=(24, 20),
        crops_coords_top_left=(4, 2),
        target_size=(16, 16),
        output_type="latent",
    ).images
    steps = []
    model.generate(
        PROMPTS,
        negative_prompt=negative,
        guidance_scale=GUIDANCE,
        latent_size=8,
        sampler=build_sampler(name, steps=STEPS),
        latents=latents,
        callback=lambda s: steps.append(s["x"]),
        sizes={"original_size": (24, 20), "crop_top_left": (4, 2)},
    )
    assert len(steps) == STEPS
    difference = (steps[-1] - expected).abs().max().item()
    assert difference <= 1e-4, (
        f"{name}: max latent difference {difference:.2e} (|z| {expected.abs().max():.1f})"
    )
    # the size conditions reach the UNet: other numbers give other latents
    steps.clear()
    model.generate(
        PROMPTS,
        negative_prompt=negative,
        guidance_scale=GUIDANCE,
        latent_size=8,
        sampler=build_sampler(name, steps=STEPS),
        latents=latents,
        callback=lambda s: steps.append(s["x"]),
    )
    assert (steps[-1] - expected).abs().max() > 1e-3
