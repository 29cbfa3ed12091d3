"""sample.py as users expect: every sampler by name, convention flags, img2img, negative prompt per prompt,
batching that does not change the images, AUTOMATIC1111 ``parameters`` in each PNG, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ldm.diffusion import DiffusionSchedule
from ldm.io.components import SDComponents
from ldm.io.single_file_export import export_components
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from tests.interop_parts import TINY_UNET, TINY_VAE, perturb, tiny_text_encoder

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    torch.manual_seed(0)
    components = SDComponents(
        perturb(UNetModel(**TINY_UNET), 4),
        perturb(AutoencoderKL(**TINY_VAE), 6),
        tiny_text_encoder(),
        DiffusionSchedule.from_config(),
        "eps",
        0.5,
        "custom",
        16,
    )
    return export_components(components, tmp_path_factory.mktemp("sd") / "tiny.safetensors")


def run(single_file, out: Path, *extra: str) -> list[Path]:
    sample.main(
        [
            "--ckpt",
            str(single_file),
            "--steps",
            "3",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--resolution",
            "16",
            *extra,
        ]
    )
    return sorted(out.glob("0*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_batching_negatives_and_png_parameters(single_file, tmp_path):
    common = [
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--negative-prompt",
        "blurry",
        "--negative-prompt",
        "",
        "--n",
        "3",
        "--sampler",
        "dpmpp_2m_karras",
        "--seed",
        "5",
    ]
    small = run(single_file, tmp_path / "b2", *common, "--batch-size", "2")
    whole = run(single_file, tmp_path / "b6", *common, "--batch-size", "6")
    assert len(small) == len(whole) == 6 and (tmp_path / "b2" / "grid.png").is_file()
    for a, b in zip(small, whole):  # image i depends on its seed, not on how the images were batched
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(small[0]) - pixels(small[1])).max() > 0  # seeds 5 and 6 differ
    text = Image.open(small[4]).text["parameters"]
    assert text.splitlines()[0] == PROMPTS[1] and "Negative prompt" not in text
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: " in text and "Seed: 9, Size: 16x16" in text
    first = Image.open(small[0]).text["parameters"].splitlines()
    assert first[:2] == [PROMPTS[0], "Negative prompt: blurry"] and "Seed: 5" in first[2]


def test_negative_prompt_changes_the_image(single_file, tmp_path):
    plain = run(single_file, tmp_path / "a", "--prompt", PROMPTS[0], "--n", "1", "--guidance", "7")
    negative = run(
        single_file,
        tmp_path / "b",
        "--prompt",
        PROMPTS[0],
        "--n",
        "1",
        "--guidance",
        "7",
        "--negative-prompt",
        "a green square",
    )
    assert np.abs(pixels(plain[0]) - pixels(negative[0])).max() > 2


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "heun", "dpmpp_2s_a"])
def test_every_sampler_and_convention_flags(single_file, tmp_path, name):
    flags = ["--timestep-spacing", "trailing", "--steps-offset", "0"]
    flags += ["--set-alpha-to-one", "true"] if name == "ddim" else []
    images = run(single_file, tmp_path, "--prompt", PROMPTS[0], "--n", "1", "--sampler", name, *flags)
    assert len(images) == 1 and np.isfinite(pixels(images[0])).all()


def test_img2img(single_file, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((32, 32, 3), (250, 10, 10), dtype=np.uint8)).save(init)
    plain = run(single_file, tmp_path / "txt", "--prompt", PROMPTS[0], "--n", "1", "--sampler", "ddim")
    light = run(
        single_file,
        tmp_path / "i2i",
        "--prompt",
        PROMPTS[0],
        "--n",
        "1",
        "--sampler",
        "ddim",
        "--init-image",
        str(init),
        "--strength",
        "0.4",
    )
    assert np.abs(pixels(plain[0]) - pixels(light[0])).max() > 2
    assert "Denoising strength: 0.4" in Image.open(light[0]).text["parameters"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--negative-prompt", "a", "--negative-prompt", "b", "--negative-prompt", "c"], "give one for all"),
        (["--init-image", "missing.png"], "--init-image missing.png: no such file"),
    ],
)
def test_bad_arguments_stop_before_loading(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "never_loaded.safetensors"), "--prompt", "x", *flags])
    assert message in capsys.readouterr().err


def test_resolution_not_a_multiple_of_the_vae_factor(single_file, tmp_path):
    with pytest.raises(SystemExit, match="not a multiple of the VAE's downsampling factor 2; use 14 or 16"):
        sample.main(
            [
                "--ckpt",
                str(single_file),
                "--prompt",
                "x",
                "--n",
                "1",
                "--resolution",
                "15",
                "--out",
                str(tmp_path),
            ]
        )


def test_lora_files_of_either_format_are_detected(single_file, tmp_path):
    """--lora takes our kohya and our PEFT exports alike (format told by the keys) and they give one image."""
    from ldm.io.kohya_lora import save_kohya_lora
    from ldm.io.peft_lora import save_peft_lora
    from ldm.models.base_loader import load_base_model
    from ldm.modules.adapters.lora import inject_lora

    components = load_base_model(single_file)
    torch.manual_seed(3)
    for module, targets in (
        (components.unet, ["*attn1.to_q", "*attn2.to_k"]),
        (components.text_encoder, ["*q_proj"]),
    ):
        for layer in inject_lora(module, targets, rank=2, alpha=1.0).values():
            torch.nn.init.normal_(layer.lora_up.weight, std=0.5)
    kohya = save_kohya_lora(tmp_path / "k.safetensors", components.unet, components.text_encoder)
    peft = save_peft_lora(tmp_path / "p.safetensors", components.unet, components.text_encoder)
    common = ["--prompt", PROMPTS[0], "--n", "1", "--sampler", "ddim"]
    plain = run(single_file, tmp_path / "plain", *common)
    with_kohya = run(single_file, tmp_path / "kohya", *common, "--lora", f"{kohya}:0.8")
    with_peft = run(single_file, tmp_path / "peft", *common, "--lora", f"{peft}:0.8")
    assert np.abs(pixels(with_kohya[0]) - pixels(with_peft[0])).max() <= 1
    assert np.abs(pixels(with_kohya[0]) - pixels(plain[0])).max() > 2
    stacked = run(single_file, tmp_path / "both", *common, "--lora", f"{kohya}:0.8", "--lora", str(peft))
    assert np.abs(pixels(stacked[0]) - pixels(with_kohya[0])).max() > 2  # the second file adds its own delta


def test_lora_format_errors_say_what_the_file_is():
    from ldm.io.lora_any import lora_format

    assert lora_format(["lora_unet_down_blocks_0_x.lora_down.weight"]) == "kohya"
    assert lora_format(["text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"]) == "peft"
    with pytest.raises(ValueError, match="raw PEFT adapter"):
        lora_format(["base_model.model.down_blocks.0.lora_A.weight"])
    with pytest.raises(ValueError, match="pre-PEFT attention-processor"):
        lora_format(["unet.down_blocks.0.attentions.0.processor.to_q_lora.lora.down.weight"])


def convert_main():
    from tests.conftest import load_script

    return load_script("scripts/convert.py").main


def test_convert_bakes_lora_files_in(single_file, tmp_path):
    """convert.py --base X --lora a:0.8 --lora b --out merged: sampling the merged file == sampling X with the
    same --lora files."""
    from ldm.io.kohya_lora import save_kohya_lora
    from ldm.io.peft_lora import save_peft_lora
    from ldm.models.base_loader import load_base_model
    from ldm.modules.adapters.lora import inject_lora

    files = []
    for seed, save in ((1, save_kohya_lora), (2, save_peft_lora)):
        components = load_base_model(single_file)
        torch.manual_seed(seed)
        for layer in inject_lora(components.unet, ["*attn2.to_v", "*ff.net.2"], rank=2).values():
            torch.nn.init.normal_(layer.lora_up.weight, std=0.3)
        files.append(save(tmp_path / f"{seed}.safetensors", components.unet))
    loras = ["--lora", f"{files[0]}:0.8", "--lora", str(files[1])]
    merged = convert_main()(
        ["--base", str(single_file), *loras, "--out", str(tmp_path / "merged.safetensors"), "--fp32"]
    )
    common = ["--prompt", PROMPTS[0], "--n", "1", "--sampler", "euler"]
    from_merged = run(merged, tmp_path / "merged", *common)
    with_loras = run(single_file, tmp_path / "loras", *common, *loras)
    plain = run(single_file, tmp_path / "plain", *common)
    assert np.abs(pixels(from_merged[0]) - pixels(with_loras[0])).max() <= 1
    assert np.abs(pixels(from_merged[0]) - pixels(plain[0])).max() > 2


def test_convert_explains_an_adapter_only_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "adapters").mkdir()
    (run_dir / "adapters" / "lora_finetune.safetensors").write_bytes(b"")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save(
        {
            "state_dict": {
                "method.unet.x.lora_down.weight": torch.zeros(2, 4),
                "scale_factor": torch.ones(()),
            },
            "base": "logs/txt2img/runs/r/checkpoints/last.ckpt",
            "model_config": {"method": {"_target_": "ldm.models.finetune.lora.LoRAMethod"}},
        },
        ckpt,
    )
    with pytest.raises(SystemExit) as stop:
        convert_main()(["--base", str(ckpt), "--out", str(tmp_path / "x.safetensors")])
    message = str(stop.value)
    assert "holds only the adapter of LoRAMethod (1 tensors)" in message
    assert (
        "--base logs/txt2img/runs/r/checkpoints/last.ckpt --lora "
        f"{run_dir / 'adapters' / 'lora_finetune.safetensors'}" in message
    )


def test_convert_states_the_scope_of_a_custom_architecture(single_file, tmp_path, capsys):
    """Only SD v1/v2 shapes load in AUTOMATIC1111 / ComfyUI / kohya / from_single_file: convert.py says so for
    any other architecture (issue 27), and the file still loads here."""
    out = convert_main()(["--base", str(single_file), "--out", str(tmp_path / "custom.safetensors")])
    printed = capsys.readouterr().out
    assert "(SD custom," in printed
    assert f"note: {out} is not an SD v1/v2/XL architecture" in printed
    assert "AUTOMATIC1111, ComfyUI" in printed
    from ldm.models.base_loader import load_base_model

    assert load_base_model(out).version == "custom"
