"""Our LoRA files as diffusers reads them (kohya keys onto its modules, same outputs), PEFT-format export and
round trip (ldm/io/peft_lora.py), and diffusers module names for any UNet depth."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from ldm.io.diffusers_config import diffusers_config_from_ldm
from ldm.io.diffusers_names import diffusers_unet_to_ldm, unet_module_names
from ldm.io.kohya_lora import save_kohya_lora
from ldm.io.peft_lora import load_peft_lora, save_peft_lora
from ldm.modules.adapters import (
    UNET_CONV,
    UNET_TRANSFORMER,
    lora_modules,
)
from tests.lora_parts import TINY, TINY_SD2, close, lora_pair, make_unet, te_out, unet_inputs, unet_out

# ------------------------------------------------------------------------------------------ diffusers


def _diffusers_unet(config):
    import diffusers

    return diffusers.UNet2DConditionModel(**diffusers_config_from_ldm(**config)).eval()


def _copy_weights_to_diffusers(unet, theirs, config):
    names = {k: k for k in theirs.state_dict()}
    ldm_of = diffusers_unet_to_ldm(names, diffusers_config_from_ldm(**config))
    ours = unet.state_dict()
    theirs.load_state_dict({diff_key: ours[ldm_key] for ldm_key, diff_key in ldm_of.items()})


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1", "sd2"])
def test_diffusers_maps_every_kohya_key_to_its_modules(te, tmp_path, config):
    """diffusers' own kohya converter must map every key onto a module of the equivalent diffusers
    UNet (attention, proj, ff, resnet convs, samplers) and of the HF CLIP text model."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    unet, te, _, _ = lora_pair(te, config=config, unet_targets=UNET_TRANSFORMER + UNET_CONV)
    path = save_kohya_lora(tmp_path / "lora.safetensors", unet, te)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    n_unet, n_te = len(lora_modules(unet)), len(lora_modules(te))
    assert all(a == 2.0 for a in alphas.values()) and len(alphas) == n_unet + n_te

    their_modules = dict(_diffusers_unet(config).named_modules())
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    peft_unet = convert_unet_state_dict_to_peft(unet_state)
    assert len(peft_unet) == 2 * n_unet
    for key, value in peft_unet.items():
        module_name, _, kind = key.rpartition(".lora_")
        module = their_modules.get(module_name)
        assert module is not None, f"diffusers maps {key} to no module of its UNet"
        dim = 1 if kind == "A.weight" else 0  # lora_A [r, in, ...], lora_B [out, r, ...]
        assert value.shape[dim] == module.weight.shape[dim], key

    te_state = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    peft_te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_state))
    hf_modules = dict(te.transformer.named_modules())  # SD v1 / transformers-4 layout: text_model.*
    assert len(peft_te) == 2 * n_te
    for key in peft_te:
        assert key.rpartition(".lora_")[0] in hf_modules, key


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1", "sd2"])
def test_diffusers_loads_our_kohya_file_to_the_same_outputs(te, tmp_path, config):
    from diffusers import StableDiffusionPipeline

    unet, te, base_unet, _ = lora_pair(te, config=config, unet_targets=UNET_TRANSFORMER + UNET_CONV)
    path = save_kohya_lora(tmp_path / "lora.safetensors", unet, te)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    theirs = _diffusers_unet(config)
    _copy_weights_to_diffusers(base_unet, theirs, config)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=theirs)
    x, t, context = unet_inputs()
    with torch.no_grad():
        assert close(theirs(x, t, encoder_hidden_states=context).sample, unet(x, t, context), atol=1e-4)


def test_peft_format_export_and_round_trip(te, tmp_path):
    unet, te, base_unet, base_te = lora_pair(te, alpha=2.0)
    path = save_peft_lora(tmp_path / "pytorch_lora_weights.safetensors", unet, te)
    tensors = load_file(path)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 64)
    assert tensors[f"{key}.lora_B.weight"].shape == (64, 4)
    assert tensors["unet.mid_block.attentions.0.proj_in.lora_A.weight"].shape == (4, 64, 1, 1)
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in tensors
    layer = lora_modules(unet)["input_blocks.3.1.transformer_blocks.0.attn1.to_q"]
    assert torch.allclose(tensors[f"{key}.lora_B.weight"], layer.lora_up.weight * 0.5)  # alpha/r folded

    theirs = _diffusers_unet(TINY)
    their_modules = dict(theirs.named_modules())
    for name in tensors:
        if name.startswith("unet."):
            assert name.removeprefix("unet.").rpartition(".lora_")[0] in their_modules, name

    fresh_unet, fresh_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    summary = load_peft_lora(path, fresh_unet, fresh_te)
    assert summary["modules"] == 60 and summary["alpha"] == 4.0
    assert close(unet_out(fresh_unet), unet_out(unet), atol=1e-6)
    assert close(te_out(fresh_te), te_out(te), atol=1e-6)

    if importlib.util.find_spec("peft") is not None:
        _copy_weights_to_diffusers(base_unet, theirs, TINY)
        theirs.load_lora_adapter(tensors, prefix="unet")
        x, t, context = unet_inputs()
        with torch.no_grad():
            assert close(theirs(x, t, encoder_hidden_states=context).sample, unet(x, t, context), atol=1e-4)


def test_unet_names_follow_config_depth():
    """3 levels, 2 ResBlocks per level, attention at levels 0 and 2 (diffusers down_blocks.0/2)."""
    config = {**TINY, "channel_mult": (1, 2, 2), "num_res_blocks": 2, "attention_resolutions": (1, 4)}
    names = unet_module_names(make_unet(config))
    assert names["input_blocks.2.1.proj_in"] == "down_blocks.0.attentions.1.proj_in"
    assert names["input_blocks.7.1.proj_in"] == "down_blocks.2.attentions.0.proj_in"
    assert names["output_blocks.2.1.proj_out"] == "up_blocks.0.attentions.2.proj_out"
    assert names["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.5.1.conv"] == "up_blocks.1.upsamplers.0.conv"  # no attention at level 1
    assert names["output_blocks.8.1.transformer_blocks.0.attn2.to_q"] == (
        "up_blocks.2.attentions.2.transformer_blocks.0.attn2.to_q"
    )
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
