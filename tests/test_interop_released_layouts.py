"""The released SD 1.5 / 2.1 architectures (meta tensors only: nothing is allocated) match our presets and
the released single files' key names and shapes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.io.sd_keys import detect_version, ema_key
from ldm.io.sd_layout import released_layout
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL

# --------------------------------------------------------------------------------------------------------
# The released architectures (meta tensors only: nothing is allocated)
# --------------------------------------------------------------------------------------------------------

SD15_UNET_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768, "downsample_padding": 1,
    "flip_sin_to_cos": True, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
SD21_UNET_CONFIG = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    **SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
    "resnet_time_scale_shift": "default", "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True,
}  # fmt: skip
SD_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
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
