"""Stable Diffusion interoperability: diffusers folders, SD single files (load/export), our Lightning
checkpoints, safety of pickles, strict key checks, hub ids offline, and sample.py on a single file.

Tiny random models throughout (every weight perturbed, so zero-initialised layers cannot hide a wrong
mapping); diffusers is a test-only dependency; nothing touches the network.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.io.openclip import hf_to_openclip, openclip_to_hf
from ldm.io.safe_load import UnsafeCheckpointError
from ldm.io.sd_keys import detect_version, ema_key
from ldm.io.sd_layout import released_layout
from ldm.io.single_file_export import export_components
from ldm.models.base_loader import latent_diffusion_from_components, load_base_model
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet_config
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL

ATOL = 1e-5
HIDDEN, MAX_LEN = 32, 12
TINY_UNET = tiny_unet_config(attention_resolutions=[1], num_heads=2, context_dim=HIDDEN)
TINY_VAE = {
    "embed_dim": 4,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "resolution": 16,
    "norm_groups": 32,
}
TINY_TEXT = {"hidden_size": HIDDEN, "num_layers": 2, "num_heads": 2, "max_length": MAX_LEN}
PROMPT = "a red circle on a blue background"


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return module


def tiny_text_encoder(seed: int = 1) -> CLIPTextEncoder:
    return perturb(CLIPTextEncoder.tiny(**TINY_TEXT), seed, 0.02)


def unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 700])[:batch],
        torch.randn(batch, MAX_LEN, HIDDEN, generator=g),
    )


def image(batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------
# A tiny diffusers pipeline on disk (SD v1 layout, and SD2 layout: linear proj, 16-wide heads, v-prediction)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["v1", "v2"])
def pipeline_dir(request, tmp_path_factory):
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    v2 = request.param == "v2"
    folder = tmp_path_factory.mktemp(f"tiny-sd-{request.param}")
    tiny_text_encoder().save_pretrained(folder / "clip", layout="diffusers")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=HIDDEN,
        attention_head_dim=(2, 2, 4, 4) if v2 else 2,
        use_linear_projection=v2,
        norm_num_groups=32,
    )
    vae = DAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v2 else "epsilon",
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
    return request.param, folder / "pipe", pipe.to(torch.float32)


def assert_same_outputs(components, unet, vae, encode_prompt, text_model=None) -> None:
    """Our components against diffusers modules: UNet output, VAE posterior mean and decode, text context."""
    x, t, context = unet_inputs()
    with torch.no_grad():
        close(components.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample)
        img = image()
        ours_mean = components.vae.encode(img).mean
        close(ours_mean, vae.encode(img).latent_dist.mean)
        close(components.vae.decode(ours_mean), vae.decode(ours_mean).sample)
        close(components.text_encoder([PROMPT]), encode_prompt(PROMPT))
        if text_model is not None:
            ids = components.text_encoder.tokenize([PROMPT])
            close(components.text_encoder.encode_ids(ids), text_model(ids)[0])


def test_diffusers_folder_matches_diffusers(pipeline_dir):
    version, folder, pipe = pipeline_dir
    components = load_base_model(folder)
    assert components.version == "custom"  # tiny: not the released architecture
    assert components.parameterization == ("v" if version == "v2" else "eps")
    assert components.scale_factor == pytest.approx(pipe.vae.config.scaling_factor)
    assert components.resolution == 64  # sample_size 8 x VAE factor 8
    assert components.unet.state_dict()["input_blocks.1.1.proj_in.weight"].ndim == (
        2 if version == "v2" else 4
    )
    close(components.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod, atol=1e-6)

    def encode(prompt):
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]

    assert_same_outputs(components, pipe.unet, pipe.vae, encode, pipe.text_encoder)


def test_export_loads_in_diffusers_from_single_file(pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    version, folder, pipe = pipeline_dir
    components = load_base_model(folder)
    # the v2 fixture is written with the OpenCLIP text layout of SD 2.x files
    path = export_components(components, tmp_path / "model.safetensors", dtype=torch.float32, version=version)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    text_key = (
        "cond_stage_model.model.token_embedding.weight"
        if version == "v2"
        else "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    )
    assert text_key in keys
    assert json.loads(meta["ldm.config"])["parameterization"] == components.parameterization

    loaded = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )

    def encode(prompt):
        return loaded.encode_prompt(prompt, "cpu", 1, False)[0]

    assert_same_outputs(components, loaded.unet, loaded.vae, encode)
    # and transitively the original pipeline's modules
    x, t, context = unet_inputs()
    with torch.no_grad():
        close(
            loaded.unet(x, t, encoder_hidden_states=context).sample,
            pipe.unet(x, t, encoder_hidden_states=context).sample,
        )

    # our loader reads the export back (metadata gives the tiny architecture and the embedded tokenizer)
    back = load_base_model(path)
    assert (back.parameterization, back.resolution) == (components.parameterization, components.resolution)
    assert_same_outputs(back, pipe.unet, pipe.vae, lambda p: pipe.encode_prompt(p, "cpu", 1, False)[0])


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


def ldm_layout_state(unet, ema, vae, text) -> dict[str, torch.Tensor]:
    """A single file as CompVis' LatentDiffusion saves it (written by hand from the module state dicts)."""
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({ema_key(k): v for k, v in ema.state_dict().items()})
    state["model_ema.num_updates"] = torch.tensor(100)
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.transformer.state_dict().items()})
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(MAX_LEN)[None]
    from ldm.diffusion import DiffusionSchedule

    state["betas"] = DiffusionSchedule.from_config().betas.float()
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


TINY_OVERRIDES = {
    "unet": TINY_UNET,
    "vae": TINY_VAE,
    "text_encoder": {
        "vocab_size": None,
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_LEN,
        "hidden_act": "quick_gelu",
    },
}


def tiny_overrides(text: CLIPTextEncoder) -> dict:
    overrides = json.loads(json.dumps(TINY_OVERRIDES))
    overrides["text_encoder"]["vocab_size"] = text.transformer.config.vocab_size
    return overrides


def assert_weights_equal(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)


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


# --------------------------------------------------------------------------------------------------------
# Our Lightning checkpoints, and sample.py on every kind of source
# --------------------------------------------------------------------------------------------------------


def lightning_checkpoint(path: Path) -> tuple[Path, object]:
    import hydra
    from omegaconf import OmegaConf

    config = {
        "_target_": "ldm.models.latent_diffusion.LatentDiffusion",
        "unet": {"_target_": "ldm.modules.unet.UNetModel", **TINY_UNET},
        "vae": {"_target_": "ldm.modules.vae.AutoencoderKL", **TINY_VAE},
        "text_encoder": {"_target_": "ldm.modules.text_encoder.CLIPTextEncoder.tiny", **TINY_TEXT},
        "schedule": {"_target_": "ldm.diffusion.DiffusionSchedule.from_config", "kind": "scaled_linear"},
        "sampler": {"_target_": "ldm.diffusion.DDIMSampler", "steps": 2},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
        "scale_factor": 0.5,
        "ema_decay": 0.9,
    }
    model = hydra.utils.instantiate(OmegaConf.create(config), _convert_="all")
    perturb(model.unet, 7)
    perturb(model.unet_ema.module, 8)
    perturb(model.vae, 9)
    torch.save({"state_dict": model.state_dict(), "model_config": config, "global_step": 1}, path)
    return path, model


def test_lightning_checkpoint_source_and_export(tmp_path):
    path, model = lightning_checkpoint(tmp_path / "last.ckpt")
    ema = load_base_model(path, use_ema=True)
    assert_weights_equal(ema.unet, model.unet_ema.module)
    raw = load_base_model(path, use_ema=False)
    assert_weights_equal(raw.unet, model.unet)
    assert (raw.scale_factor, raw.parameterization, raw.resolution) == (0.5, "eps", 16)
    with pytest.raises(TypeError, match="cannot be overridden"):
        load_base_model(path, unet=TINY_UNET)

    out = export_components(load_base_model(path, use_ema=True), tmp_path / "exported.safetensors", dtype=torch.float32)
    back = load_base_model(out)
    assert_weights_equal(back.unet, model.unet_ema.module)
    assert_weights_equal(back.vae, model.vae)
    torch.testing.assert_close(back.text_encoder([PROMPT]), model.text_encoder([PROMPT]))

    # the CLI: any source -> single file (raw UNet, fp32)
    from tests.conftest import load_script

    convert = load_script("scripts/convert.py")
    converted = convert.main(
        ["--base", str(path), "--out", str(tmp_path / "cli.safetensors"), "--no-ema", "--fp32"]
    )
    assert_weights_equal(load_base_model(converted).unet, model.unet)


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


# --------------------------------------------------------------------------------------------------------
# The released architectures (meta tensors only: nothing is allocated)
# --------------------------------------------------------------------------------------------------------

SD15_UNET_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768, "downsample_padding": 1, "flip_sin_to_cos": True,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
SD21_UNET_CONFIG = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    **SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
    "resnet_time_scale_shift": "default", "sample_size": 96, "upcast_attention": True, "use_linear_projection": True,
}  # fmt: skip
SD_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
REAL_KEYS = {  # names and shapes in the released single files
    "v1": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320, 1, 1],
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": [10240, 1280],
        "model.diffusion_model.output_blocks.2.1.conv.weight": [1280, 1280, 3, 3],
        "model.diffusion_model.output_blocks.5.2.conv.weight": [1280, 1280, 3, 3],
        "model.diffusion_model.output_blocks.8.2.conv.weight": [640, 640, 3, 3],
        "model.diffusion_model.time_embed.0.weight": [1280, 320],
        "model.diffusion_model.out.2.weight": [4, 320, 3, 3],
        "first_stage_model.encoder.down.0.downsample.conv.weight": [128, 128, 3, 3],
        "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
        "first_stage_model.decoder.up.3.upsample.conv.weight": [512, 512, 3, 3],
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": [128, 256, 1, 1],
        "first_stage_model.quant_conv.weight": [8, 8, 1, 1],
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": [768, 3072],
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768],
    },
    "v2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320],
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 1024],
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": [3072, 1024],
        "cond_stage_model.model.positional_embedding": [77, 1024],
        "cond_stage_model.model.token_embedding.weight": [49408, 1024],
        "cond_stage_model.model.ln_final.weight": [1024],
    },
}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_released_architectures_match_presets_and_key_names(version):
    from ldm.io.describe import describe_unet
    from ldm.io.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
    from ldm.io.sd_presets import PRESETS, version_of
    from ldm.io.strict_load import state_dict_mismatches

    state = released_layout(version)
    for key, shape in REAL_KEYS[version].items():
        assert list(state[key].shape) == shape, key
    assert detect_version(state) == version
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"

    preset = PRESETS[version]
    unet_config = unet_config_from_diffusers(SD15_UNET_CONFIG if version == "v1" else SD21_UNET_CONFIG)
    assert version_of(unet_config, preset["text_encoder"]) == version
    with torch.device("meta"):
        from_diffusers, from_preset = UNetModel(**unet_config), UNetModel(**preset["unet"])
        vae_a, vae_b = (
            AutoencoderKL(**vae_config_from_diffusers(SD_VAE_CONFIG)),
            AutoencoderKL(**preset["vae"]),
        )
    assert state_dict_mismatches(from_preset.state_dict(), from_diffusers.state_dict()) == ""
    assert state_dict_mismatches(vae_b.state_dict(), vae_a.state_dict()) == ""
    assert {k: describe_unet(from_preset)[k] for k in preset["unet"]} == preset["unet"]
