"""Real SDXL files against diffusers, on a tiny random ``StableDiffusionXLPipeline`` saved here: a diffusers
SDXL folder loads with equal outputs (UNet, VAE, both text encoders + pooled vector) and its scheduler config;
our SDXL single-file export (sgm's layout) is read by ``StableDiffusionXLPipeline.from_single_file`` and by us
with the same outputs; fp16 files convert on reading with the VAE kept at fp32; a replacement VAE
(``vae_path``) in every layout is the one used; and files of the wrong family, a refiner's text encoder over a
base UNet, a VAE of the wrong shape are refused naming what was found and what fits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldm.io.sd_keys import detect_version
from ldm.io.single_file_export import export_components
from ldm.models.base_loader import load_base_model
from tests.interop_parts import assert_weights_equal, ldm_layout_state, perturb
from tests.interop_parts import tiny_text_encoder as sd1_text_encoder
from tests.sdxl_parts import POOLED, WIDTH_G, assert_same_xl_outputs, size_batch, tiny_xl_pipeline

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "pipe"
    return folder, tiny_xl_pipeline(folder)


def test_sdxl_folder_loads_with_equal_outputs_and_its_scheduler(xl, tmp_path):
    folder, pipe = xl
    components = load_base_model(folder)
    assert components.text_encoder_2 is not None and components.scale_factor == pytest.approx(0.13025)
    assert (components.text_encoder.layer, components.text_encoder.final_layer_norm) == ("penultimate", False)
    assert (components.text_encoder_2.layer, components.text_encoder_2.final_layer_norm) == (
        "penultimate",
        False,
    )
    convention = components.schedule.convention
    assert (convention.spacing, convention.steps_offset) == ("leading", 1)  # SDXL's EulerDiscrete config
    torch.testing.assert_close(components.schedule.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod)
    assert_same_xl_outputs(components, pipe)
    # the folder's scheduler config is what counts
    changed = tmp_path / "trailing"
    shutil.copytree(folder, changed)
    config_file = changed / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(timestep_spacing="trailing", steps_offset=0)
    config_file.write_text(json.dumps(config))
    convention = load_base_model(changed).schedule.convention
    assert (convention.spacing, convention.steps_offset) == ("trailing", 0)


def test_sdxl_single_file_export_reads_in_diffusers_and_back(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    folder, pipe = xl
    components = load_base_model(folder)
    # changed weights, so that reading the file (not the config folder's weights) is what is checked
    for module, seed in ((components.unet, 7), (components.vae, 8), (components.text_encoder_2, 9)):
        perturb(module, seed, 0.01)
    path = export_components(components, tmp_path / "xl.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_slice("conditioner.embedders.1.model.text_projection").get_shape() == [WIDTH_G, POOLED]
        in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
        assert f.get_slice(in_proj).get_shape() == [3 * WIDTH_G, WIDTH_G]
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert "text_encoder_2" in json.loads(meta["ldm.config"])

    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_xl_outputs(components, loaded)
    with pytest.raises(AssertionError):  # the file's weights, not the folder's
        assert_same_xl_outputs(components, pipe)
    back = load_base_model(path)
    assert back.text_encoder_2 is not None
    assert_same_xl_outputs(back, loaded)


def test_fp16_sdxl_file_converts_on_reading_and_keeps_the_vae_fp32(xl, tmp_path):
    folder, pipe = xl
    path = export_components(load_base_model(folder), tmp_path / "half.safetensors")  # fp16 by default
    full = load_base_model(path)
    assert {p.dtype for p in full.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in full.text_encoder_2.parameters()} == {torch.float32}
    assert_same_xl_outputs(full, pipe, atol=3e-2)
    half = load_base_model(path, dtype="fp16")
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in half.text_encoder_2.parameters()} == {torch.float16}
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}  # SDXL's VAE overflows in fp16
    assert {p.dtype for p in load_base_model(folder, dtype="fp16").vae.parameters()} == {torch.float32}


def test_replacement_vae_in_every_layout_is_the_one_used(xl, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE
    from safetensors.torch import save_file

    folder, pipe = xl
    base = load_base_model(folder)
    tuned = perturb(DiffusersVAE.from_config(pipe.vae.config).eval(), 21)  # a "fine-tuned" VAE
    tuned.save_pretrained(tmp_path / "vae_folder")
    save_file(
        {k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "diffusers.safetensors")
    )
    from_folder = load_base_model(folder, vae_path=tmp_path / "vae_folder").vae
    with pytest.raises(AssertionError):
        assert_weights_equal(from_folder, base.vae)
    # the same weights in LDM names, with and without the full checkpoint's prefix
    ldm_state = {k: v.contiguous() for k, v in from_folder.state_dict().items()}
    save_file(ldm_state, str(tmp_path / "ldm.safetensors"))
    save_file(
        {"first_stage_model." + k: v for k, v in ldm_state.items()}, str(tmp_path / "prefixed.safetensors")
    )
    for name in ("diffusers.safetensors", "ldm.safetensors", "prefixed.safetensors"):
        assert_weights_equal(load_base_model(folder, vae_path=tmp_path / name).vae, from_folder)
    # a VAE of the wrong shape: refused, naming the key, the shapes and what fits
    other = DiffusersVAE.from_config({**pipe.vae.config, "block_out_channels": (32, 32)})
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(
        ValueError, match=r"other\.safetensors.*VAE.*\[32, 32, 3, 3\] vs \[64, 32, 3, 3\].*ch_mult"
    ):
        load_base_model(folder, vae_path=tmp_path / "other.safetensors")
    other.save_pretrained(tmp_path / "other_folder")
    with pytest.raises(ValueError, match=r"other_folder.*ch_mult \[1, 1\] vs \[1, 2\]"):
        load_base_model(folder, vae_path=tmp_path / "other_folder")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    from ldm.modules.unet import UNetModel
    from ldm.modules.vae import AutoencoderKL
    from tests.interop_parts import TINY_UNET, TINY_VAE

    text = sd1_text_encoder()
    torch.manual_seed(0)
    unet = UNetModel(**TINY_UNET)
    state = ldm_layout_state(unet, unet, AutoencoderKL(**TINY_VAE), text)
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    save_file(state, str(path))
    return path, text


def test_family_mismatch_and_mixed_refiner_are_refused_naming_what_fits(xl, sd1_file, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = xl
    path = export_components(load_base_model(folder), tmp_path / "xl.safetensors")
    state = load_file(str(path))
    assert detect_version(state) == "sdxl"
    with pytest.raises(
        ValueError, match=r"xl\.safetensors is an SDXL base file, but preset 'v1'.*use preset 'sdxl'"
    ):
        load_base_model(path, preset="v1")
    sd1_path, _ = sd1_file
    with pytest.raises(
        ValueError, match=r"sd1\.safetensors is an SD v1 file.*preset 'sdxl' is an SDXL.*'v1'"
    ):
        load_base_model(sd1_path, preset="sdxl")
    # a refiner's keys (bigG alone at conditioner.embedders.0.model.*) over a base UNet: read as a refiner
    # (tests/test_sdxl_refiner.py loads real ones), and refused by the strict shapes naming the preset
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in state.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    assert detect_version(refiner) == "sdxl_refiner"
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(
        ValueError, match=r"refiner\.safetensors: the UNet weights do not match.*preset 'sdxl_refiner'"
    ):
        load_base_model(tmp_path / "refiner.safetensors")
    refiner_folder = tmp_path / "refiner"
    shutil.copytree(folder, refiner_folder)
    index = json.loads((refiner_folder / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    (refiner_folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"text_encoder_2 width 48 != UNet cross_attention_dim 80"):
        load_base_model(refiner_folder)


def test_sample_py_samples_an_sdxl_folder_and_file(xl, tmp_path):
    import sample

    folder, _ = xl
    path = export_components(load_base_model(folder), tmp_path / "xl.safetensors")
    for ckpt, out in ((folder, tmp_path / "from_folder"), (path, tmp_path / "from_file")):
        grid = sample.main(
            ["--ckpt", str(ckpt), "--prompt", "a red circle", "--negative-prompt", "blue", "--n", "1"]
            + ["--steps", "2", "--sampler", "euler", "--device", "cpu", "--out", str(out)]
        )
        assert grid.is_file() and len(list(out.glob("000_*.png"))) == 1


SDXL_REAL_KEYS = {  # names and shapes in the released sd_xl_base_1.0.safetensors
    "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": [640, 640],
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": [1280, 2048],
    "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": [768, 3072],
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [768],
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": [3840, 1280],
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": [5120, 1280],
    "conditioner.embedders.1.model.text_projection": [1280, 1280],
    "conditioner.embedders.1.model.positional_embedding": [77, 1280],
    "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280],
    "conditioner.embedders.1.model.ln_final.weight": [1280],
}


def test_released_sdxl_layout_matches_the_preset_and_is_detected():
    from ldm.io.openclip import openclip_to_hf_projected
    from ldm.io.sd_keys import split_single_file
    from ldm.io.sd_layout import released_layout
    from ldm.io.sd_presets import PRESETS
    from ldm.io.strict_load import state_dict_mismatches
    from ldm.modules.text_encoder import CLIPTextEncoder
    from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder

    state = released_layout("sdxl")  # meta tensors: nothing allocated
    for key, shape in SDXL_REAL_KEYS.items():
        assert list(state[key].shape) == shape, key
    assert detect_version(state) == "sdxl"
    groups = split_single_file(state, "sd_xl_base_1.0.safetensors")
    preset = PRESETS["sdxl"]
    clip_l = CLIPTextEncoder.from_config(preset["text_encoder"], device="meta").transformer.state_dict()
    bigg = PooledCLIPTextEncoder.from_config(preset["text_encoder_2"], device="meta").transformer.state_dict()
    assert state_dict_mismatches(clip_l, groups["clip"]) == ""
    assert state_dict_mismatches(bigg, openclip_to_hf_projected(groups["clip_g"], 32)) == ""
    assert (preset["scale_factor"], preset["resolution"]) == (0.13025, 1024)


def test_convert_py_writes_an_sdxl_single_file(xl, tmp_path):
    from safetensors import safe_open

    from scripts import convert

    folder, pipe = xl
    out = convert.main(["--base", str(folder), "--out", str(tmp_path / "xl.safetensors"), "--fp32"])
    with safe_open(str(out), framework="pt") as f:
        assert "conditioner.embedders.1.model.text_projection" in set(f.keys())
    assert_same_xl_outputs(load_base_model(out), pipe)
    folder_out = convert.main(["--base", str(out), "--diffusers", "--out", str(tmp_path / "xl_folder")])
    index = json.loads((folder_out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and (folder_out / "text_encoder_2").is_dir()
    assert_same_xl_outputs(load_base_model(folder_out), pipe, atol=1e-4)


def test_finetune_base_takes_an_sdxl_file_and_a_replacement_vae(xl, compose_cfg, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE
    from hydra.utils import instantiate

    folder, pipe = xl
    path = export_components(load_base_model(folder), tmp_path / "xl.safetensors")
    perturb(DiffusersVAE.from_config(pipe.vae.config), 31).save_pretrained(tmp_path / "vae")
    cfg = compose_cfg(
        [
            "experiment=lora_finetune",
            "model/method=full",
            f"model.base={path}",
            f"model.vae_path={tmp_path / 'vae'}",
        ]
    )
    model = instantiate(cfg.model)
    model.prepare(str(path))
    assert len(model.conditioner.text_embedders) == 2 and len(model.conditioner.embedders) == 5
    assert_weights_equal(model.vae, load_base_model(folder, vae_path=tmp_path / "vae").vae)
    conditions = model.conditions(size_batch(["a red circle"]))
    assert conditions["crossattn"].shape[-1] == 32 + WIDTH_G and conditions["vector"].shape[-1] == POOLED + 48


def test_sample_py_vae_flag_replaces_the_vae(xl, tmp_path, capsys):
    from diffusers import AutoencoderKL as DiffusersVAE

    import sample
    from ldm.models.pipeline import load_for_sampling

    folder, pipe = xl
    perturb(DiffusersVAE.from_config(pipe.vae.config), 41).save_pretrained(tmp_path / "vae")
    model = load_for_sampling(str(folder), vae=str(tmp_path / "vae"))
    assert_weights_equal(model.vae, load_base_model(folder, vae_path=tmp_path / "vae").vae)
    with pytest.raises(AssertionError):
        assert_weights_equal(model.vae, load_base_model(folder).vae)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(folder), "--prompt", "x", "--vae", str(tmp_path / "missing.safetensors")])
    assert "--vae" in (err := capsys.readouterr().err) and "no such file or folder" in err


def test_sdxl_diffusers_folder_export_loads_in_diffusers_and_back(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ldm.io.diffusers_export import export_diffusers_folder

    folder, pipe = xl
    components = load_base_model(folder)
    perturb(components.unet, 51, 0.01)  # so the written weights, not a copy of the folder's, are compared
    out = export_diffusers_folder(components, tmp_path / "out")
    loaded = StableDiffusionXLPipeline.from_pretrained(out)
    scheduler = loaded.scheduler.config
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.timestep_spacing, scheduler.steps_offset) == ("leading", 1)
    assert loaded.vae.config.scaling_factor == pytest.approx(0.13025) and loaded.vae.config.force_upcast
    assert_same_xl_outputs(components, loaded)
    assert_same_xl_outputs(load_base_model(out), loaded)
    with pytest.raises(AssertionError):
        assert_same_xl_outputs(components, pipe)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_diffusers_folder(components, out)


def test_sd1_diffusers_folder_export_round_trip(sd1_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldm.io.diffusers_export import export_diffusers_folder
    from tests.interop_parts import tiny_overrides, unet_inputs

    path, text = sd1_file
    tokenizer_dir = tmp_path / "tok"
    text.tokenizer.save_pretrained(tokenizer_dir)
    components = load_base_model(path, use_ema=False, tokenizer=tokenizer_dir, **tiny_overrides(text))
    out = export_diffusers_folder(components, tmp_path / "sd1", dtype="fp16")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16
    back = load_base_model(out)
    assert back.text_encoder_2 is None
    torch.testing.assert_close(back.schedule.alphas_cumprod, components.schedule.alphas_cumprod)
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = components.unet(x, t, context)
        torch.testing.assert_close(back.unet(x, t, context), expected, atol=2e-2, rtol=1e-2)
        theirs = pipe.unet.float()(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(theirs, expected, atol=2e-2, rtol=1e-2)


def test_released_vocabulary_gives_bigg_a_tokenizer_padding_with_bang(tmp_path):
    from transformers import CLIPTokenizer

    from ldm.io.single_file import _bigg_tokenizer

    vocab = {
        "!": 0,
        **{f"t{i}</w>": i for i in range(1, 49406)},
        "<|startoftext|>": 49406,
        "<|endoftext|>": 49407,
    }
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    clip = CLIPTokenizer.from_pretrained(str(tmp_path), pad_token="<|endoftext|>")
    bigg = _bigg_tokenizer(clip, embedded=False)
    ids = lambda tok: tok("t5", padding="max_length", max_length=6).input_ids
    assert ids(clip)[-1] == 49407 and ids(bigg)[-1] == 0  # SDXL's tokenizer_2 pads with "!" (id 0)
    assert ids(clip)[:3] == ids(bigg)[:3]
    embedded = _bigg_tokenizer(clip, embedded=True)  # our exports' embedded tokenizer serves both, as it is,
    assert ids(embedded) == ids(clip) and embedded is not clip  # but as a copy: a token added to one encoder
    embedded.add_tokens(["<toy>"])  # (an embedding) does not reach the other's vocabulary without its row
    assert "<toy>" not in clip.get_vocab()
