"""SD single files in the original LDM layout: round trips with EMA, fp16 export, unsafe pickles refused,
mismatches named by key and shape, version detection (SD2's OpenCLIP layout), hub ids offline, and
sample.py on a single file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.io.openclip import hf_to_openclip, openclip_to_hf
from ldm.io.safe_load import UnsafeCheckpointError
from ldm.io.sd_keys import detect_version
from ldm.io.single_file_export import export_components
from ldm.models.base_loader import latent_diffusion_from_components, load_base_model
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from tests.interop_parts import (
    HIDDEN,
    PROMPT,
    TINY_UNET,
    TINY_VAE,
    assert_weights_equal,
    close,
    ldm_layout_state,
    perturb,
    tiny_overrides,
    tiny_text_encoder,
    unet_inputs,
)

# --------------------------------------------------------------------------------------------------------
# Original LDM layout single files
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldm_parts():
    torch.manual_seed(0)
    unet = perturb(UNetModel(**TINY_UNET), 4)
    ema = perturb(UNetModel(**TINY_UNET), 5)
    vae = perturb(AutoencoderKL(**TINY_VAE), 6)
    return unet, ema, vae, tiny_text_encoder()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_layout_single_file_round_trip_and_ema(ldm_parts, tmp_path, suffix):
    unet, ema, vae, text = ldm_parts
    state = ldm_layout_state(unet, ema, vae, text)
    path = tmp_path / f"sd{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        import numpy as np

        torch.save({"state_dict": state, "global_step": np.int64(100), "epoch": 3}, path)
    tokenizer_dir = tmp_path / "tok"
    text.tokenizer.save_pretrained(tokenizer_dir)
    overrides = tiny_overrides(text)

    with_ema = load_base_model(path, use_ema=True, tokenizer=tokenizer_dir, **overrides)
    assert_weights_equal(with_ema.unet, ema)
    assert_weights_equal(with_ema.vae, vae)
    assert_weights_equal(with_ema.text_encoder.transformer, text.transformer)
    assert (with_ema.parameterization, with_ema.scale_factor, with_ema.version) == ("eps", 0.18215, "custom")
    raw = load_base_model(path, use_ema=False, tokenizer=tokenizer_dir, **overrides)
    assert_weights_equal(raw.unet, unet)
    torch.testing.assert_close(raw.text_encoder([PROMPT]), text([PROMPT]))
    assert raw.unet.training is False and raw.unet.input_blocks[0][0].weight.requires_grad
    assert not any(p.requires_grad for p in raw.vae.parameters())


def test_export_round_trip_fp16_and_sampling_model(ldm_parts, tmp_path):
    unet, _ema, vae, text = ldm_parts
    from ldm.diffusion import DiffusionSchedule
    from ldm.io.components import SDComponents

    components = SDComponents(unet, vae, text, DiffusionSchedule.from_config(), "eps", 0.5, "custom", 16)
    path = export_components(components, tmp_path / "half.safetensors", metadata={"note": {"steps": 3}})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert f.metadata()["note"] == '{"steps": 3}'
    back = load_base_model(path, dtype="fp32")
    assert back.scale_factor == 0.5 and back.unet.out[2].weight.dtype == torch.float32
    x, t, context = unet_inputs()
    with torch.no_grad():
        close(back.unet(x, t, context), unet(x, t, context), atol=5e-2)
    model = latent_diffusion_from_components(back)
    assert model.latent_size() == 8


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*builtins\.getattr.*arbitrary code"):
        load_base_model(path)
    assert not marker.exists()


def test_mismatched_checkpoints_name_keys_and_shapes(ldm_parts, tmp_path):
    from safetensors.torch import save_file

    unet, ema, vae, text = ldm_parts
    state = ldm_layout_state(unet, ema, vae, text)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    # the released SD v1 architecture (detected) against tiny weights: shapes named, nothing allocated
    with pytest.raises(
        ValueError, match=r"UNet.*input_blocks\.0\.0\.weight \[32, 4, 3, 3\] vs \[320, 4, 3, 3\]"
    ):
        load_base_model(path)
    # wrong preset (SD2: linear proj_in, other heads) with the tiny sizes
    overrides = tiny_overrides(text)
    overrides["unet"] = {**TINY_UNET, "use_linear_in_transformer": True}
    with pytest.raises(ValueError, match=r"proj_in\.weight \[32, 32, 1, 1\] vs \[32, 32\].*preset"):
        load_base_model(path, use_ema=False, **overrides)
    # truncated file: the missing VAE tensor is named
    truncated = dict(state)
    del truncated["first_stage_model.decoder.conv_out.weight"]
    save_file(truncated, str(tmp_path / "truncated.safetensors"))
    with pytest.raises(
        ValueError, match=r"VAE.*1 missing from the file.*decoder\.conv_out\.weight \[3, 32, 3, 3\]"
    ):
        load_base_model(tmp_path / "truncated.safetensors", **tiny_overrides(text))
    # foreign keys stop the load
    save_file(
        {**state, "control_model.zero_convs.0.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors")
    )
    with pytest.raises(ValueError, match=r"outside the Stable Diffusion layout.*control_model"):
        load_base_model(tmp_path / "extra.safetensors", **tiny_overrides(text))


def test_version_detection_and_openclip_layout():
    sd1 = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
            320, 768
        ),
    }
    sd2 = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
            320, 1024
        ),
    }
    assert (detect_version(sd1), detect_version(sd2)) == ("v1", "v2")

    text = tiny_text_encoder()
    hf = text.transformer.state_dict()
    openclip = hf_to_openclip(hf)
    assert openclip["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * HIDDEN, HIDDEN)
    # SD2 files hold one more block than the diffusers layout keeps (the penultimate layer is used)
    extra = {k.replace("resblocks.1.", "resblocks.2."): v for k, v in openclip.items() if "resblocks.1." in k}
    back = openclip_to_hf(
        {**openclip, **extra, "logit_scale": torch.ones(()), "text_projection": torch.eye(HIDDEN)},
        num_layers=2,
    )
    assert back.keys() == hf.keys()
    for key in hf:
        torch.testing.assert_close(back[key], hf[key], msg=key)


def test_hub_id_offline_is_a_fast_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match=r"Hugging Face Hub id.*HF_HUB_OFFLINE=1.*local"):
        load_base_model("no-such-org/no-such-sd-model")
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_base_model("./missing/model.safetensors")


def test_sample_py_accepts_a_single_file(ldm_parts, tmp_path):
    import sample
    from ldm.diffusion import DiffusionSchedule
    from ldm.io.components import SDComponents

    unet, _, vae, text = ldm_parts
    components = SDComponents(unet, vae, text, DiffusionSchedule.from_config(), "eps", 0.5, "custom", 16)
    path = export_components(components, tmp_path / "tiny.safetensors")
    grid = sample.main(
        [
            "--ckpt",
            str(path),
            "--prompt",
            PROMPT,
            "--n",
            "1",
            "--steps",
            "2",
            "--sampler",
            "ddim",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert Path(grid).is_file() and len(list((tmp_path / "out").glob("000_*.png"))) == 1
