"""Our samplers reproduce diffusers' StableDiffusionPipeline end to end on a tiny random SD-v1 folder.

Same weights (the folder), same prompt, same initial latents passed in, same generator for the ancestral
noise; the folder's scheduler_config.json (SD v1's: leading, steps_offset 1, set_alpha_to_one false) sets
our timestep conventions through ``load_base_model``.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.diffusion import SD_CONVENTION, build_sampler
from ldm.models.base_loader import latent_diffusion_from_components, load_base_model
from tests.test_interop import HIDDEN, perturb, tiny_text_encoder

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle on a blue background"
STEPS, GUIDANCE = 10, 5.0
# our name -> (diffusers scheduler class, extra config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-sd-parity")
    tiny_text_encoder().save_pretrained(folder / "clip", layout="diffusers")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=2, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=16,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(
        vae=perturb(vae, 2), text_encoder=CLIPTextModel.from_pretrained(folder / "clip" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "clip" / "tokenizer"), unet=perturb(unet, 3),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    model = latent_diffusion_from_components(load_base_model(folder / "pipe"))
    pipe.folder_scheduler_config = scheduler.config  # what scheduler_config.json says; tests swap schedulers
    return pipe, model


def diffusers_images(pipe, name, latents, seed):
    class_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.folder_scheduler_config, **extra)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(),
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images


def test_folder_sets_the_timestep_convention(tiny_pipeline):
    _, model = tiny_pipeline
    assert model.schedule.convention == SD_CONVENTION  # leading, offset 1, set_alpha_to_one False
    assert build_sampler("ddim", steps=10).timesteps(model.schedule) == list(range(901, 0, -100))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sampler_matches_diffusers_pipeline(tiny_pipeline, name):
    pipe, model = tiny_pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    expected = diffusers_images(pipe, name, latents, seed=7)
    ours = model.generate([PROMPT], guidance_scale=GUIDANCE, sampler=build_sampler(name, steps=STEPS),
                          latents=latents, generator=torch.Generator().manual_seed(7))
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ours.shape == expected.shape
    difference = (ours - expected).abs().max().item()
    assert difference <= 1e-4, f"{name}: max pixel difference {difference:.2e}"
    # the conventions matter: our own (trailing, final alpha 1) gives a visibly different image
    if name == "ddim":
        other = model.generate([PROMPT], guidance_scale=GUIDANCE, latents=latents,
                               sampler=build_sampler(name, steps=STEPS, timestep_spacing="trailing",
                                                     steps_offset=0, set_alpha_to_one=True))
        assert ((other / 2 + 0.5).clamp(0, 1) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name,spacing", [("ddim", "trailing"), ("euler", "linspace"), ("euler_a", "trailing"),
                                          ("dpmpp_2m", "linspace")])
def test_other_spacings_match_diffusers(tiny_pipeline, name, spacing):
    """The conventions are options: the same override on both sides still agrees (incl. diffusers' initial
    noise scale and the linspace grid for Euler, the steps + 1 grid for DPM-Solver++). Compared in latent
    space, relative to the latents' size: this random model's final latents reach |z| ~ 60, where float32
    rounding alone is ~1e-4, which its VAE then amplifies."""
    pipe, model = tiny_pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    class_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.folder_scheduler_config, timestep_spacing=spacing,
                                                               **extra)
    expected = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(),
                    generator=torch.Generator().manual_seed(1), output_type="latent").images

    def final_latents(seed):
        steps = []
        model.generate([PROMPT], guidance_scale=GUIDANCE, sampler=build_sampler(name, steps=STEPS,
                       timestep_spacing=spacing), latents=latents, generator=torch.Generator().manual_seed(seed),
                       callback=lambda state: steps.append(state["x"]))
        assert len(steps) == STEPS
        return steps[-1]

    relative = (final_latents(1) - expected).abs().max() / expected.abs().max()
    assert relative.item() <= 1e-5
    if name == "euler_a":  # the ancestral noise comes from the generator
        assert ((final_latents(2) - expected).abs().max() / expected.abs().max()).item() > 1e-3
