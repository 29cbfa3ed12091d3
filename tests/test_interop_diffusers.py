"""diffusers folders (SD v1 and SD2 layouts) load to diffusers' outputs, and our single-file export loads in
diffusers' from_single_file. diffusers is a test-only dependency; nothing touches the network."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.io.single_file_export import export_components
from ldm.models.base_loader import load_base_model
from tests.interop_parts import HIDDEN, PROMPT, close, image, perturb, tiny_text_encoder, unet_inputs

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
