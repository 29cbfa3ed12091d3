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
from tests.interop_parts import HIDDEN, perturb, tiny_text_encoder

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
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=2,
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
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=perturb(vae, 2),
        text_encoder=CLIPTextModel.from_pretrained(folder / "clip" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "clip" / "tokenizer"),
        unet=perturb(unet, 3),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    model = latent_diffusion_from_components(load_base_model(folder / "pipe"))
    pipe.folder_scheduler_config = scheduler.config  # what scheduler_config.json says; tests swap schedulers
    pipe.folder = folder / "pipe"
    return pipe, model


def diffusers_images(pipe, name, latents, seed):
    class_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.folder_scheduler_config, **extra)
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images


def test_folder_sets_the_timestep_convention(tiny_pipeline):
    _, model = tiny_pipeline
    # the folder names its spacing: every sampler takes it (a folder naming none: SD_CONVENTION)
    assert model.schedule.convention == SD_CONVENTION.replace(spacing="leading")
    assert build_sampler("ddim", steps=10).timesteps(model.schedule) == list(range(901, 0, -100))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sampler_matches_diffusers_pipeline(tiny_pipeline, name):
    pipe, model = tiny_pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    expected = diffusers_images(pipe, name, latents, seed=7)
    ours = model.generate(
        [PROMPT],
        guidance_scale=GUIDANCE,
        sampler=build_sampler(name, steps=STEPS),
        latents=latents,
        generator=torch.Generator().manual_seed(7),
    )
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ours.shape == expected.shape
    difference = (ours - expected).abs().max().item()
    assert difference <= 1e-4, f"{name}: max pixel difference {difference:.2e}"
    # the conventions matter: our own (trailing, final alpha 1) gives a visibly different image
    if name == "ddim":
        other = model.generate(
            [PROMPT],
            guidance_scale=GUIDANCE,
            latents=latents,
            sampler=build_sampler(
                name, steps=STEPS, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True
            ),
        )
        assert ((other / 2 + 0.5).clamp(0, 1) - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "name,spacing",
    [("ddim", "trailing"), ("euler", "linspace"), ("euler_a", "trailing"), ("dpmpp_2m", "linspace")],
)
def test_other_spacings_match_diffusers(tiny_pipeline, name, spacing):
    """The conventions are options: the same override on both sides still agrees (incl. diffusers' initial
    noise scale and the linspace grid for Euler, the steps + 1 grid for DPM-Solver++). Compared in latent
    space, relative to the latents' size: this random model's final latents reach |z| ~ 60, where float32
    rounding alone is ~1e-4, which its VAE then amplifies."""
    pipe, model = tiny_pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    class_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(
        pipe.folder_scheduler_config, timestep_spacing=spacing, **extra
    )
    expected = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
    ).images

    def final_latents(seed):
        steps = []
        model.generate(
            [PROMPT],
            guidance_scale=GUIDANCE,
            sampler=build_sampler(name, steps=STEPS, timestep_spacing=spacing),
            latents=latents,
            generator=torch.Generator().manual_seed(seed),
            callback=lambda state: steps.append(state["x"]),
        )
        assert len(steps) == STEPS
        return steps[-1]

    relative = (final_latents(1) - expected).abs().max() / expected.abs().max()
    assert relative.item() <= 1e-5
    if name == "euler_a":  # the ancestral noise comes from the generator
        assert ((final_latents(2) - expected).abs().max() / expected.abs().max()).item() > 1e-3


# -- LoRA files saved by diffusers (PEFT format) -------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_lora(tiny_pipeline, tmp_path_factory):
    """A PEFT LoRA on the UNet (alpha != r, from the adapter metadata) and the text encoder, saved by
    diffusers."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline[0].folder, safety_checker=None)
    torch.manual_seed(11)
    unet_config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    text_config = LoraConfig(
        r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)  # transformers 5's add_adapter wants peft >= 0.22
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def lora_images(tiny_pipeline, path, multiplier=1.0):
    """(diffusers with load_lora_weights, ours through sample.py's loader) images for the same latents."""
    from diffusers import StableDiffusionPipeline

    from ldm.models import pipeline

    folder = tiny_pipeline[0].folder
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[multiplier])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(), output_type="pt"
    ).images
    model = pipeline.load_for_sampling(str(folder), loras=[f"{path}:{multiplier}"])
    ours = model.generate(
        [PROMPT], guidance_scale=GUIDANCE, sampler=build_sampler("ddim", steps=STEPS), latents=latents
    )
    return (ours / 2 + 0.5).clamp(0, 1), expected


def test_diffusers_peft_lora_loads_like_diffusers(tiny_pipeline, diffusers_lora):
    from safetensors.torch import load_file

    keys = list(load_file(str(diffusers_lora)))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    ours, expected = lora_images(tiny_pipeline, diffusers_lora, multiplier=0.7)
    assert (ours - expected).abs().max().item() <= 1e-4
    pipe, _ = tiny_pipeline  # the LoRA matters: the plain pipeline gives another image
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.folder_scheduler_config)
    plain = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="pt",
        latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
    ).images
    assert (plain - expected).abs().max() > 1e-3


@pytest.mark.parametrize("spelling", ["text_model.encoder.layers.", "encoder.layers."])
def test_peft_text_encoder_keys_in_both_transformers_spellings(
    tiny_pipeline, diffusers_lora, tmp_path, spelling
):
    """transformers 4 CLIP paths carry text_model., transformers 5 ones do not; both load to the same
    model."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(diffusers_lora), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
        metadata = handle.metadata()
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("text_encoder."):
            rest = key.removeprefix("text_encoder.").removeprefix("text_model.")
            key = "text_encoder." + spelling + rest.removeprefix("encoder.layers.")
        renamed[key] = value
    assert sum(k.startswith(f"text_encoder.{spelling}") for k in renamed) == sum(
        k.startswith("text_encoder.") for k in tensors
    )
    path = (
        save_file(renamed, str(tmp_path / "lora.safetensors"), metadata=metadata)
        or tmp_path / "lora.safetensors"
    )
    ours, expected = lora_images(tiny_pipeline, diffusers_lora)
    ours_renamed, _ = lora_images(tiny_pipeline, path)
    assert (ours_renamed - ours).abs().max().item() == 0.0 and (ours - expected).abs().max().item() <= 1e-4
    assert json.loads(metadata["lora_adapter_metadata"])  # alpha comes from diffusers' adapter metadata
