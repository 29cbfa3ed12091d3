"""The SDXL demo's measuring code at tiny sizes: benchmarks/sdxl_crops.py's border criterion on images with
known answers and on the training data at fixed crops, its sampling at given size conditions, and
benchmarks/memory.py's SDXL mode (the vector condition y fed, bf16 LoRA, a sampling step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from datamodules.shapes import Layout, render
from tests.conftest import compose_train, load_script

crops = load_script("benchmarks/sdxl_crops.py")


@pytest.mark.parametrize(
    "layout, expected",
    [
        (Layout(6, 6, 20, 20), set()),  # well inside: whole
        (Layout(-6, 8, 20, 20), {"left"}),
        (Layout(8, -6, 20, 20), {"top"}),
        (Layout(16, 16, 20, 20), {"bottom", "right"}),
        (Layout(-6, -6, 20, 20), {"top", "left"}),
    ],
)
def test_touched_sides_reads_which_borders_cut_the_shape(layout, expected):
    for shape in ("square", "circle"):
        image = render("red", shape, "blue", 32, layout)
        assert crops.touched_sides(image) == expected, (shape, layout)
    # the same in the model's format, a tensor [3, H, W] in [-1, 1]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    assert crops.touched_sides(tensor) == expected


def test_touched_sides_finds_no_shape_in_a_flat_image():
    assert crops.touched_sides(np.full((32, 32, 3), 90, dtype=np.uint8)) is None
    stats = crops.crop_stats([np.full((32, 32, 3), 90, dtype=np.uint8), render("red", "square", "blue", 32)])
    assert stats["n"] == 2 and stats["empty"] == 0.5 and stats["whole"] == 0.5


def test_the_training_data_cut_by_the_crop_it_took():
    """experiment=txt2img_sdxl's data (40 px renders, a 32 px window kept): crop (0, 0) can only cut at the
    bottom and right, (8, 8) only at the top and left, an uncropped render never."""
    prompts = ["a red circle on a blue background", "a green square on a white background"] * 12
    at_origin = crops.crop_stats(crops.data_images(prompts, 32, 40, (0, 0)))
    far = crops.crop_stats(crops.data_images(prompts, 32, 40, (8, 8)))
    whole = crops.crop_stats(crops.data_images(prompts, 32, 32, (0, 0)))
    assert at_origin["top"] == at_origin["left"] == 0 and at_origin["bottom"] > 0.2
    assert far["bottom"] == far["right"] == 0 and far["top"] > 0.2
    assert whole["whole"] == 1.0
    assert "| original 40, crop (8, 8) | " in crops.table(
        [{"label": "original 40, crop (8, 8)", "samples": far, "data": far}]
    )


def test_sample_at_conditions_on_the_crop(tmp_path):
    """A random tiny txt2img_sdxl model: the same seeds at another crop give other images (the crop
    reaches the UNet's vector), the same crop the same images."""
    from ldm.diffusion import build_sampler

    cfg = compose_train(tmp_path, ["experiment=txt2img_sdxl", "model/vae=tiny", "model.scale_factor=1.0"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():  # an untrained UNet's zero-initialised output layers ignore every condition
        for param in model.parameters():  # the EMA copy, which sampling uses, included
            param.add_(0.05 * torch.randn_like(param))
    model.image_resolution = 32
    sampler = build_sampler("ddim", steps=2)
    prompts = ["a red circle on a blue background"] * 2
    a = crops.sample_at(model, prompts, sampler, (0, 0), 40, seed=3)
    b = crops.sample_at(model, prompts, sampler, (8, 8), 40, seed=3)
    again = crops.sample_at(model, prompts, sampler, (0, 0), 40, seed=3)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, again) and not torch.allclose(a, b)


def test_memory_benchmark_sdxl_mode_at_tiny_size():
    """The SDXL UNet needs its vector y (pooled text + sizes): the benchmark feeds it; LoRA with bf16 weights
    trains the same LoRA parameters; the sampling step runs at batch 2 (guidance) without gradients."""
    memory = load_script("benchmarks/memory.py")
    unet = memory.build_unet("sdxl_tiny")
    z, context, y = memory.unet_inputs(unet, 1, 4, "cpu")
    assert context.shape == (1, 77, 80) and y.shape == (1, 232)
    with pytest.raises(ValueError, match="label embedding"):
        unet(z, torch.tensor([1]), context)  # what the benchmark did before its SDXL mode
    rows = {v: memory.run_variant(v, "sdxl_tiny", 32, 1, 1, "cpu") for v in ("lora", "lora_bf16", "sample")}
    assert rows["lora_bf16"]["trainable_m"] == rows["lora"]["trainable_m"] > 0
    assert rows["sample"]["trainable_m"] == 0 and rows["sample"]["step_cpu_s"] >= 0
    assert memory.SDXL_VARIANTS[0] == "lora" and "full" not in memory.SDXL_VARIANTS
    # the bf16 rows build the UNet in bf16: no fp32 copy sets the peak (2.6 G params: 9.6 GiB)
    bf16 = memory.build_unet("sdxl_tiny", torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {
        torch.bfloat16
    } and torch.get_default_dtype() == torch.float32
