"""ldm.models.pipeline as a library (what the benchmarks and scripts use without sample.py): the generate
loop's seeding and batching, negative prompts paired per prompt, LoRA stacking on load, and the same images
as the command line writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ldm.diffusion import build_sampler
from ldm.models import pipeline
from ldm.utils.images import to_uint8
from tests.test_sample_cli import PROMPTS, single_file  # noqa: F401 (fixture)


def generate(model, **kwargs) -> list:
    sampler = build_sampler("ddim", steps=2)
    return list(pipeline.generate_batches(model, sampler, PROMPTS, progress=False, **kwargs))


def test_pair_negatives():
    assert pipeline.pair_negatives(["a", "b"], None) == ["", ""]
    assert pipeline.pair_negatives(["a", "b"], ["x"]) == ["x", "x"]
    assert pipeline.pair_negatives(["a", "b"], ["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        pipeline.pair_negatives(["a", "b"], ["x", "y", "z"])


def test_batches_are_prompt_major_seeded_per_image_and_independent_of_batch_size(single_file):  # noqa: F811
    model = pipeline.load_for_sampling(str(single_file), resolution=16)
    assert model.image_resolution == 16
    small = generate(model, negatives=["blurry", ""], n=2, seed=3, batch_size=3)
    whole = generate(model, negatives=["blurry", ""], n=2, seed=3, batch_size=4)
    assert [b.start for b in small] == [0, 3] and [len(b.seeds) for b in small] == [3, 1]
    assert [p for b in small for p in b.prompts] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [n for b in small for n in b.negatives] == ["blurry", "blurry", "", ""]
    assert [s for b in small for s in b.seeds] == [3, 4, 5, 6]
    torch.testing.assert_close(torch.cat([b.images for b in small]), whole[0].images, atol=1e-5, rtol=0)
    other_seed = generate(model, negatives=["blurry", ""], n=2, seed=4, batch_size=4)[0].images
    torch.testing.assert_close(other_seed[0], whole[0].images[1], atol=1e-5, rtol=0)  # image i <- seed + i


def test_ancestral_images_depend_on_their_seed_alone(single_file):  # noqa: F811
    """Euler a draws each step's noise from the image's own generator (after its initial latents), so image
    i is seed + i's image in any batch; before, the per-step noise restarted from the batch's first seed."""
    model = pipeline.load_for_sampling(str(single_file), resolution=16)
    sampler = build_sampler("euler_a", steps=3)

    def images(seed, batch_size):
        batches = pipeline.generate_batches(
            model, sampler, PROMPTS[:1], n=2, seed=seed, batch_size=batch_size, progress=False
        )
        return torch.cat([b.images for b in batches])

    together, alone = images(3, 2), images(4, 1)
    torch.testing.assert_close(together, images(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=0)


def test_the_command_line_writes_what_the_library_generates(single_file, tmp_path):  # noqa: F811
    sample.main(
        [
            "--ckpt",
            str(single_file),
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--n",
            "1",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--resolution",
            "16",
            "--seed",
            "7",
            "--out",
            str(tmp_path),
        ]
    )
    model = pipeline.load_for_sampling(str(single_file), resolution=16)
    images = torch.cat([b.images for b in generate(model, n=1, seed=7)])
    for i, (array, prompt) in enumerate(zip(to_uint8(images), PROMPTS)):
        written = np.asarray(Image.open(tmp_path / f"{i:03d}_{sample.slug(prompt)}.png"))
        assert np.abs(written.astype(int) - array.astype(int)).max() <= 1


def test_stacked_loras_add_up_on_load(single_file, tmp_path):  # noqa: F811
    """Two LoRA files given together merge both deltas: the same weights as one file at the summed
    multiplier."""
    from ldm.io.kohya_lora import save_kohya_lora
    from ldm.models.base_loader import load_base_model
    from ldm.modules.adapters.lora import inject_lora

    components = load_base_model(single_file)
    torch.manual_seed(3)
    for layer in inject_lora(components.unet, ["*attn1.to_k"], rank=2, alpha=1.0).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.5)
    lora = save_kohya_lora(tmp_path / "a.safetensors", components.unet, None)
    base = pipeline.load_for_sampling(str(single_file), resolution=16)
    stacked = pipeline.load_for_sampling(
        str(single_file), resolution=16, loras=[f"{lora}:0.5", f"{lora}:0.25"]
    )
    once = pipeline.load_for_sampling(str(single_file), resolution=16, loras=[f"{lora}:0.75"])
    key = next(k for k in base.unet.state_dict() if k.endswith("attn1.to_k.weight"))
    assert not torch.equal(stacked.unet.state_dict()[key], base.unet.state_dict()[key])
    torch.testing.assert_close(stacked.unet.state_dict()[key], once.unet.state_dict()[key])
