"""kohya LoRA files (ldm/io/kohya_lora.py): names, shapes, alpha and metadata, round trips into fresh models,
stacked files, fp16, bad keys, conv LoRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.io.kohya_lora import load_kohya_lora, save_kohya_lora
from ldm.io.safe_load import read_safetensors_metadata as read_kohya_metadata
from ldm.modules.adapters import (
    UNET_CONV,
    inject_lora,
    lora_modules,
)
from tests.lora_parts import (
    PROMPTS,
    TINY,
    TINY_SD2,
    close,
    lora_pair,
    make_unet,
    randomize_lora,
    te_out,
    unet_out,
)

# ------------------------------------------------------------------------------------------ kohya


# Written by hand from the diffusers layout of the tiny config (down_blocks.0 has no attention,
# down_blocks.1.attentions.0 = input_blocks.3.1, mid_block.attentions.0 = middle_block.1,
# up_blocks.0.attentions.{0,1} = output_blocks.{0,1}.1), not from the code under test.
EXPECTED_SHAPES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 64),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight": (64, 4),
    "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": (4, 64, 1, 1),
    "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight": (64, 4, 1, 1),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 64),
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight": (512, 4),
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2.lora_down.weight": (4, 256),
    "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight": (4, 64),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 64),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight": (64, 4),
    "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": (256, 4),
    "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": (4, 256),
}


def test_kohya_file_names_shapes_alpha_metadata(te, tmp_path):
    unet, te, _, _ = lora_pair(te)
    path = save_kohya_lora(tmp_path / "sub" / "my_lora.safetensors", unet, te, metadata={"ss_steps": 10})
    tensors = load_file(path)
    assert len(tensors) == 3 * (48 + 12)
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(tensors[key].shape) == shape, key
    blocks = {
        k.split("_transformer_blocks")[0].split("_proj_")[0] for k in tensors if k.startswith("lora_unet_")
    }
    assert blocks == {
        "lora_unet_down_blocks_1_attentions_0",
        "lora_unet_mid_block_attentions_0",
        "lora_unet_up_blocks_0_attentions_0",
        "lora_unet_up_blocks_0_attentions_1",
    }
    alpha = tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0

    meta = read_kohya_metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "my_lora" and meta["ss_steps"] == "10"
    assert meta["ss_network_train_unet_only"] == "False" and len(meta["sshs_model_hash"]) == 64
    with safe_open(str(path), "pt") as handle:  # hash = sha256 of the data after the header
        assert handle.metadata() == meta
    raw = path.read_bytes()
    import hashlib

    header = int.from_bytes(raw[:8], "little")
    assert hashlib.sha256(raw[8 + header :]).hexdigest() == meta["sshs_model_hash"]


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1", "sd2"])
def test_kohya_round_trip_into_fresh_models(te, tmp_path, config):
    unet, te, base_unet, base_te = lora_pair(te, config=config)
    path = save_kohya_lora(tmp_path / "a.safetensors", unet, te)
    if config is TINY_SD2:
        assert read_kohya_metadata(path)["ss_base_model_version"] == "sd_v2"
        assert load_file(path)["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].ndim == 2

    fresh_unet, fresh_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    summary = load_kohya_lora(path, fresh_unet, fresh_te)
    assert (
        summary["modules"] == 60 and summary["unet_modules"] == 48 and summary["text_encoder_modules"] == 12
    )
    assert summary["rank"] == 4 and summary["alpha"] == 2.0 and not summary["skipped"]
    assert summary["metadata"]["ss_network_dim"] == "4"
    assert torch.equal(unet_out(fresh_unet), unet_out(unet))
    assert torch.equal(te_out(fresh_te), te_out(te))

    # multiplier 0 == base model
    zero_unet, zero_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    load_kohya_lora(path, zero_unet, zero_te, multiplier=0.0)
    assert torch.equal(unet_out(zero_unet), unet_out(base_unet))
    assert torch.equal(te_out(zero_te), te_out(base_te))

    # merge=True folds the delta into plain modules; the text encoder's prompt cache is invalidated
    merged_unet, merged_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    cached_before = merged_te.encode_cached(PROMPTS)
    load_kohya_lora(path, merged_unet, merged_te, merge=True)
    assert not lora_modules(merged_unet) and not lora_modules(merged_te)
    assert close(unet_out(merged_unet), unet_out(unet), atol=1e-4)
    assert close(merged_te.encode_cached(PROMPTS), te_out(te), atol=1e-4)
    assert not close(cached_before, te_out(te), atol=1e-4)

    # LDM-named kohya keys (written by some tools, read by A1111) load too
    src, ldm = "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_middle_block_1_proj_in"
    ldm_named = {k.replace(src, ldm): v for k, v in load_file(path).items() if k.startswith(src + ".")}
    alias_unet = copy.deepcopy(base_unet)
    assert load_kohya_lora(ldm_named, alias_unet)["module_names"] == ["unet.middle_block.1.proj_in"]
    with pytest.raises(ValueError, match="same module"):
        load_kohya_lora({**load_file(path), **ldm_named}, copy.deepcopy(base_unet), copy.deepcopy(base_te))


def test_kohya_stacked_files_sum_their_deltas(te, tmp_path):
    unet_a, te_a, base_unet, base_te = lora_pair(te, seed=1)
    unet_b, te_b, _, _ = lora_pair(copy.deepcopy(base_te), seed=7, rank=2, alpha=1.0)
    file_a = save_kohya_lora(tmp_path / "a.safetensors", unet_a, te_a)
    file_b = save_kohya_lora(tmp_path / "b.safetensors", unet_b, te_b)
    deltas_a = {n: m.delta_weight() for n, m in lora_modules(unet_a).items()}
    deltas_b = {n: m.delta_weight() for n, m in lora_modules(unet_b).items()}

    stacked = copy.deepcopy(base_unet)
    load_kohya_lora(file_a, stacked, multiplier=0.7, merge=True, strict=False)
    summary = load_kohya_lora(file_b, stacked, multiplier=-1.3, merge=True, strict=False)
    assert len(summary["skipped"]) == 12  # the lora_te_* entries: no text encoder given
    base_weights = dict(base_unet.named_parameters())
    for name, module in stacked.named_modules():
        if name in deltas_a:
            expected = base_weights[f"{name}.weight"] + 0.7 * deltas_a[name] - 1.3 * deltas_b[name]
            assert torch.allclose(module.weight, expected, atol=1e-5), name

    # one file injected (trainable, adjustable), another merged underneath it
    mixed = copy.deepcopy(base_unet)
    load_kohya_lora(file_a, mixed, multiplier=0.7, strict=False)
    load_kohya_lora(file_b, mixed, multiplier=-1.3, merge=True, strict=False)
    assert close(unet_out(mixed), unet_out(stacked), atol=1e-4)
    with pytest.raises(ValueError, match="already carries a LoRA"):
        load_kohya_lora(file_b, mixed, strict=False)


def test_kohya_fp16_and_missing_alpha(te, tmp_path):
    unet, te, base_unet, _ = lora_pair(te, alpha=2.0)
    tensors = load_file(save_kohya_lora(tmp_path / "a.safetensors", unet, te))
    half = {k: v.half() for k, v in tensors.items() if not k.endswith(".alpha")}
    save_file(half, str(tmp_path / "half.safetensors"))
    fresh = copy.deepcopy(base_unet)
    holder = nn.ModuleDict({"diffusion_model": fresh})  # a module holding the UNet works too
    summary = load_kohya_lora(tmp_path / "half.safetensors", holder, strict=False)
    assert summary["alpha"] == 4.0 and summary["rank"] == 4  # missing alpha -> alpha = rank
    layer = lora_modules(fresh)["middle_block.1.transformer_blocks.0.attn1.to_q"]
    assert layer.scale == 1.0 and layer.lora_down.weight.dtype == torch.float32
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    assert torch.equal(layer.lora_up.weight, half[key].float())
    assert summary["metadata"] == {}


def test_kohya_unknown_or_bad_keys_fail_clearly(te, tmp_path):
    unet, te, base_unet, base_te = lora_pair(te)
    tensors = load_file(save_kohya_lora(tmp_path / "a.safetensors", unet, te))
    bogus = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # no attention at level 0
    bad = {
        **tensors,
        f"{bogus}.lora_down.weight": torch.zeros(4, 32),
        f"{bogus}.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    fresh = copy.deepcopy(base_unet)
    with pytest.raises(KeyError, match=bogus):
        load_kohya_lora(tmp_path / "bad.safetensors", fresh, copy.deepcopy(base_te))
    assert not lora_modules(fresh)  # nothing half-applied
    summary = load_kohya_lora(bad, fresh, copy.deepcopy(base_te), strict=False)
    assert summary["skipped"] == [bogus] and summary["modules"] == 60

    with pytest.raises(KeyError, match="text_encoder"):  # te keys, but no text encoder given
        load_kohya_lora(tensors, copy.deepcopy(base_unet))
    with pytest.raises(ValueError, match="not plain LoRA"):
        load_kohya_lora({**tensors, f"{bogus}.hada_w1_a": torch.zeros(1)}, copy.deepcopy(base_unet))
    with pytest.raises(ValueError, match="lack lora_down or lora_up"):
        partial = {k: v for k, v in tensors.items() if not k.endswith("mlp_fc1.lora_up.weight")}
        load_kohya_lora(partial, copy.deepcopy(base_unet), copy.deepcopy(base_te))
    with pytest.raises(KeyError, match="not kohya LoRA keys"):
        load_kohya_lora({"lora_te1_text_model_x.alpha": torch.tensor(1.0)}, copy.deepcopy(base_unet))
    wrong = dict(tensors)
    key = "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"
    wrong[key] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(ValueError, match="do not fit"):
        load_kohya_lora(wrong, copy.deepcopy(base_unet), copy.deepcopy(base_te))


def test_conv_lora_kohya_names_and_round_trip(tmp_path):
    unet = make_unet()
    base = copy.deepcopy(unet)
    inject_lora(unet, UNET_CONV, rank=2, alpha=1.0)
    randomize_lora(unet)
    path = save_kohya_lora(tmp_path / "locon.safetensors", unet)
    tensors = load_file(path)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.alpha" in tensors
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in tensors
    assert "lora_unet_up_blocks_1_resnets_1_conv_shortcut.alpha" in tensors
    assert "lora_unet_mid_block_resnets_1_time_emb_proj.alpha" in tensors
    assert json.loads(read_kohya_metadata(path)["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    load_kohya_lora(path, base)
    assert torch.equal(unet_out(base), unet_out(unet))
