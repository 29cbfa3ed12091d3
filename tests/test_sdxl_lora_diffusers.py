"""Our SDXL LoRA files in diffusers: a LoRA on the UNet and both text encoders, written by
``ldm.io.sdxl_lora.save_sdxl_lora``, loaded by ``StableDiffusionXLPipeline.load_lora_weights`` into a tiny
random SDXL pipeline, gives the latents our model gives with the same LoRA (same weights, initial latents,
sampler); and a file diffusers writes (``save_lora_weights``) reads back into ours."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm.diffusion import build_sampler
from ldm.io.sdxl_lora import load_sdxl_lora, save_sdxl_lora
from ldm.modules.adapters.lora import TEXT_ENCODER, UNET_TRANSFORMER, inject_lora, lora_parameters
from tests.test_sdxl_pipeline_parity import GUIDANCE, PROMPTS, SCHEDULER, STEPS, tiny_xl  # noqa: F401

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")


def with_lora(model):
    """A copy of ``model`` (the pipeline shares its text encoders) with seeded LoRA layers everywhere."""
    model = copy.deepcopy(model)
    inject_lora(model.unet, UNET_TRANSFORMER, rank=4, alpha=2)
    for encoder in model.conditioner.text_embedders:
        inject_lora(encoder.transformer, TEXT_ENCODER, rank=4, alpha=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (model.unet, *model.conditioner.text_embedders):
            for p in lora_parameters(module):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            getattr(module, "clear_cache", lambda: None)()
    return model


def parts_of(model) -> dict:
    first, second = model.conditioner.text_embedders
    return {"unet": model.unet, "text_encoder": first, "text_encoder_2": second}


def final_latents(pipe, model, latents):
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER)
    expected = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=latents.clone(),
        height=16,
        width=16,
        output_type="latent",
    ).images
    steps = []
    model.generate(
        PROMPTS,
        guidance_scale=GUIDANCE,
        latent_size=8,
        sampler=build_sampler("euler", steps=STEPS),
        latents=latents,
        callback=lambda s: steps.append(s["x"]),
    )
    return steps[-1], expected


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_our_sdxl_lora_file_in_diffusers_gives_our_latents(tiny_xl, tmp_path, layout):  # noqa: F811
    pipe, base = tiny_xl
    model = with_lora(base)
    path = save_sdxl_lora(tmp_path / f"{layout}.safetensors", parts_of(model), layout=layout)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    plain, _ = final_latents(pipe, base, latents)
    pipe.load_lora_weights(str(path))
    try:
        ours, theirs = final_latents(pipe, model, latents)
    finally:
        pipe.unload_lora_weights()
    difference = (ours - theirs).abs().max().item()
    assert difference <= 1e-4, f"{layout}: max latent difference {difference:.2e}"
    assert (ours - plain).abs().max() > 100 * max(difference, 1e-6)  # the LoRA changed the latents


def test_a_file_diffusers_writes_reads_into_ours(tiny_xl, tmp_path):  # noqa: F811
    pipe, base = tiny_xl
    model = with_lora(base)
    ours_file = save_sdxl_lora(tmp_path / "ours.safetensors", parts_of(model), layout="peft")
    pipe.load_lora_weights(str(ours_file), adapter_name="ours")
    try:
        from peft.utils import get_peft_model_state_dict

        layers = {
            "unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name="ours"),
            "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder, adapter_name="ours"),
            "text_encoder_2_lora_layers": get_peft_model_state_dict(pipe.text_encoder_2, adapter_name="ours"),
        }
        diffusers.StableDiffusionXLPipeline.save_lora_weights(str(tmp_path / "theirs"), **layers)
    finally:
        pipe.unload_lora_weights()
    fresh = copy.deepcopy(base)
    summary = load_sdxl_lora(tmp_path / "theirs" / "pytorch_lora_weights.safetensors", parts_of(fresh))
    assert summary["format"] == "peft" and summary["text_encoder_2_modules"] > 0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    steps_ours, steps_read = [], []
    for m, steps in ((model, steps_ours), (fresh, steps_read)):
        m.generate(
            PROMPTS,
            guidance_scale=GUIDANCE,
            latent_size=8,
            sampler=build_sampler("euler", steps=STEPS),
            latents=latents,
            callback=lambda s, steps=steps: steps.append(s["x"]),
        )
    assert (steps_ours[-1] - steps_read[-1]).abs().max() <= 1e-5
