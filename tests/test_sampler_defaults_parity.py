"""What a user comparing with diffusers gets on an SD 1.x/2.x base (issue 27, items 1-3).

A folder whose ``scheduler_config.json`` names no ``timestep_spacing`` (the released SD 1.5 one:
``PNDMScheduler``, ``steps_offset`` 1) is sampled by each diffusers scheduler swapped in with ``from_config``
at that scheduler's own default spacing; ours must follow per sampler. Karras sigmas come in two named
conventions (AUTOMATIC1111's over the model's sigma range, diffusers' per scheduler). ``generate_batches``
draws an image's initial latents and its per-step noise from one generator, as diffusers'
``generator=torch.manual_seed(seed)`` does.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldm.diffusion import SD_CONVENTION, build_sampler
from ldm.models import pipeline
from tests.test_sampling_parity import GUIDANCE, PROMPT, STEPS, tiny_pipeline  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")

RELEASED_SD15_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def released(tiny_pipeline, tmp_path_factory):  # noqa: F811
    """(diffusers pipeline, our model, the folder) for the tiny folder with SD 1.5's released scheduler."""
    pipe, _ = tiny_pipeline
    folder = tmp_path_factory.mktemp("released") / "pipe"
    shutil.copytree(pipe.folder, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SD15_SCHEDULER))
    return pipe, pipeline.load_for_sampling(str(folder)), folder


def diffusers_latents(pipe, class_name, config, latents=None, seed=1, **extra):
    pipe.scheduler = getattr(diffusers, class_name).from_config(config, **extra)
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=None if latents is None else latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images


def our_latents(model, sampler, latents, seed=1):
    steps = []
    model.generate(
        [PROMPT],
        guidance_scale=GUIDANCE,
        sampler=sampler,
        latents=latents,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda state: steps.append(state["x"]),
    )
    return steps[-1]


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_folder_without_spacing_samples_at_each_schedulers_default(released, name):
    """diffusers' from_config default per scheduler (linspace for the k-samplers, leading for DDIM/DDPM);
    the old default, leading + offset 1 for all, differs visibly for the k-samplers."""
    pipe, model, _ = released
    assert model.schedule.convention == SD_CONVENTION
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    config = RELEASED_SD15_SCHEDULER
    expected = diffusers_latents(pipe, CLASSES[name], config, latents)
    assert relative(our_latents(model, build_sampler(name, steps=STEPS), latents), expected) <= 1e-5
    spacing = getattr(diffusers, CLASSES[name]).from_config(config).config.timestep_spacing
    assert spacing == ("leading" if name in ("ddim", "ddpm") else "linspace")
    if spacing != "leading":
        old = our_latents(model, build_sampler(name, steps=STEPS, timestep_spacing="leading"), latents)
        assert relative(old, expected) > 1e-3


@pytest.mark.parametrize("name", ["euler_karras", "heun_karras", "dpmpp_2m_karras"])
def test_karras_conventions_against_diffusers(tiny_pipeline, name):  # noqa: F811
    """karras_convention="diffusers" is diffusers' use_karras_sigmas=True for that scheduler (Euler, Heun:
    over the spaced steps' sigmas -- visible under the folder's leading spacing); the default, AUTOMATIC1111's
    range, differs from it for Euler and Heun and equals it for DPM++ (whose diffusers range is the whole)."""
    pipe, model = tiny_pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    class_name = CLASSES[name.removesuffix("_karras")]
    expected = diffusers_latents(
        pipe, class_name, pipe.folder_scheduler_config, latents, use_karras_sigmas=True
    )
    ours = build_sampler(name, steps=STEPS, karras_convention="diffusers")
    assert relative(our_latents(model, ours, latents), expected) <= 1e-5
    a1111 = relative(our_latents(model, build_sampler(name, steps=STEPS), latents), expected)
    assert a1111 <= 1e-5 if name == "dpmpp_2m_karras" else a1111 > 1e-3


@pytest.mark.parametrize("name", ["euler_a", "euler"])
def test_seed_reproduces_diffusers_generator(released, name):
    """generate_batches(seed=S): diffusers' image for generator=torch.manual_seed(S) (initial latents and
    Euler a's per-step noise from that one stream), and image i of a batch is seed S + i's image."""
    pipe, model, _ = released
    sampler = build_sampler(name, steps=STEPS)
    batch = next(
        pipeline.generate_batches(model, sampler, [PROMPT], n=2, guidance=GUIDANCE, seed=5, progress=False)
    )
    for i in range(2):
        pipe.scheduler = getattr(diffusers, CLASSES[name]).from_config(RELEASED_SD15_SCHEDULER)
        expected = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(5 + i),
            output_type="pt",
        ).images
        ours = (batch.images[i : i + 1] / 2 + 0.5).clamp(0, 1)
        assert (ours - expected).abs().max().item() <= 1e-4, f"image {i}"
    alone = next(
        pipeline.generate_batches(model, sampler, [PROMPT], n=1, guidance=GUIDANCE, seed=6, progress=False)
    )
    torch.testing.assert_close(alone.images[0], batch.images[1], atol=1e-5, rtol=0)
