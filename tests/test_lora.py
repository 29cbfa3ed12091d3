"""LoRA layers and injection (ldm/modules/adapters/lora.py), kohya and PEFT files (ldm/io/*_lora.py)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.io.diffusers_config import diffusers_config_from_ldm
from ldm.io.diffusers_names import diffusers_unet_to_ldm, unet_module_names
from ldm.io.kohya_lora import load_kohya_lora, save_kohya_lora
from ldm.io.peft_lora import load_peft_lora, save_peft_lora
from ldm.io.safe_load import read_safetensors_metadata as read_kohya_metadata
from ldm.modules.adapters import (
    TEXT_ENCODER,
    TEXT_ENCODER_ALL,
    UNET_ATTENTION,
    UNET_ATTENTION_PROJ,
    UNET_CONV,
    UNET_FF,
    UNET_TRANSFORMER,
    LoRAConv2d,
    LoRALinear,
    inject_lora,
    load_lora_state_dict,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    set_lora_multiplier,
    unmerge_lora,
)
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet_config
from ldm.modules.unet import UNetModel

# conf/model/unet/tiny.yaml: levels (1, 2), one ResBlock per level, attention at the 2x level only.
TINY = tiny_unet_config()
TINY_SD2 = {**TINY, "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}
PROMPTS = ["a red circle on a blue background", "a sks square"]


def make_unet(config=TINY, seed=0) -> UNetModel:
    """Tiny UNet with every parameter randomised (so zero-initialised layers carry signal)."""
    unet = UNetModel(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet.eval()


def unet_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.tensor([10, 700]),
        torch.randn(2, 5, 64, generator=gen),
    )


@torch.no_grad()
def unet_out(unet):
    return unet(*unet_inputs())


@torch.no_grad()
def randomize_lora(model, seed=1, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_modules(model).values():
        for p in (layer.lora_down.weight, layer.lora_up.weight):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory):
    return CLIPTextEncoder.tiny(cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture
def te(tiny_te):
    return copy.deepcopy(tiny_te)


def te_out(te):
    with torch.no_grad():
        return te(PROMPTS)


# ------------------------------------------------------------------------------------------ layers


def test_zero_init_identity_and_layer_types(te):
    unet = make_unet()
    before_unet, before_te = unet_out(unet), te_out(te)
    injected = inject_lora(unet, UNET_TRANSFORMER, rank=4)
    injected_te = inject_lora(te, TEXT_ENCODER_ALL, rank=4)
    assert torch.equal(unet_out(unet), before_unet)
    assert torch.equal(te_out(te), before_te)

    # tiny: 4 spatial transformers (down 1, mid 1, up 2) x (8 attention + 2 proj + 2 ff); 2 CLIP layers x 6.
    assert len(injected) == 48 and len(injected_te) == 12
    proj_in = injected["middle_block.1.proj_in"]
    assert isinstance(proj_in, LoRAConv2d) and proj_in.lora_down.weight.shape == (4, 64, 1, 1)
    to_q = injected["input_blocks.3.1.transformer_blocks.0.attn1.to_q"]
    assert isinstance(to_q, LoRALinear) and to_q.lora_up.weight.abs().sum() == 0
    assert to_q.lora_down.weight.abs().sum() > 0 and to_q.scale == 1.0
    # base weights stay under their original keys
    keys = unet.state_dict().keys()
    assert "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "input_blocks.3.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in keys
    assert not any(".base." in k for k in keys)


def test_preset_counts_and_pattern_rules():
    def count(targets, config=TINY):
        return len(inject_lora(make_unet(config), targets))

    assert count(UNET_ATTENTION) == 32
    assert count(UNET_ATTENTION_PROJ) == 40
    assert count(UNET_FF) == 8
    sd2 = inject_lora(make_unet(TINY_SD2), UNET_ATTENTION_PROJ)
    assert isinstance(sd2["middle_block.1.proj_out"], LoRALinear)  # SD2: linear proj_in/out
    # ResBlock convs (3x3 and 1x1 skip), emb projections, Downsample.op, Upsample.conv
    conv = inject_lora(make_unet(), UNET_CONV, rank=2)
    assert isinstance(conv["input_blocks.1.0.in_layers.2"], LoRAConv2d)
    assert conv["input_blocks.1.0.in_layers.2"].lora_down.weight.shape == (2, 32, 3, 3)
    assert "input_blocks.2.0.op" in conv and "output_blocks.1.2.conv" in conv
    assert isinstance(conv["input_blocks.1.0.emb_layers.1"], LoRALinear)

    unet = make_unet()
    regex = inject_lora(unet, [r"re:middle_block\.1\.transformer_blocks\.0\.attn2\.to_(k|v)"], rank=2)
    assert sorted(regex) == [
        "middle_block.1.transformer_blocks.0.attn2.to_k",
        "middle_block.1.transformer_blocks.0.attn2.to_v",
    ]
    with pytest.raises(ValueError, match="already carry a LoRA"):
        inject_lora(unet, UNET_ATTENTION)
    with pytest.raises(ValueError, match="matches"):
        inject_lora(make_unet(), ["*.no_such_layer"])


def test_only_adapter_parameters_get_gradients(te):
    unet = make_unet()
    inject_lora(unet, UNET_TRANSFORMER, rank=4, dropout=0.1)
    inject_lora(te, TEXT_ENCODER)
    unet.train()
    adapters = lora_parameters(unet)
    assert len(adapters) == 2 * 48
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in adapters}

    x, t, _ = unet_inputs()
    context = te.encode_ids(te.tokenize(PROMPTS))  # grads flow into the text-encoder LoRA too
    unet(x, t, context).square().mean().backward()
    for name, p in unet.named_parameters():
        if ".lora_" not in name:
            assert p.grad is None, name
    for name, p in te.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    assert all(p.grad is not None for p in adapters)
    # up is zero-initialised, so at step 0 only lora_up receives a non-zero gradient
    assert any(layer.lora_up.weight.grad.abs().sum() > 0 for layer in lora_modules(unet).values())


def test_merge_unmerge_round_trip_and_multiplier():
    unet = make_unet()
    inject_lora(unet, UNET_TRANSFORMER + UNET_CONV, rank=4, alpha=2.0)
    randomize_lora(unet)
    originals = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" not in n}
    base = {n: p for n, p in unet.named_parameters() if ".lora_" not in n}
    unmerged = unet_out(unet)
    assert not close(unmerged, unet_out(make_unet()))

    merge_lora(unet)
    assert all(layer.merged for layer in lora_modules(unet).values())
    assert close(unet_out(unet), unmerged)
    assert not torch.equal(base["middle_block.1.proj_in.weight"], originals["middle_block.1.proj_in.weight"])

    set_lora_multiplier(unet, 0.5)  # re-merges with the new strength
    merged_half = unet_out(unet)
    unmerge_lora(unet)
    assert close(unet_out(unet), merged_half)
    for name, value in originals.items():
        assert torch.allclose(base[name], value, atol=1e-6), name

    set_lora_multiplier(unet, 0.0)  # weights are the originals to float rounding
    assert close(unet_out(unet), unet_out(make_unet()), atol=1e-6)


@pytest.mark.parametrize("merge", [False, True])
def test_remove_lora_restores_plain_modules_and_keys(merge):
    unet = make_unet()
    original_keys = list(unet.state_dict())
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    inject_lora(unet, UNET_TRANSFORMER + UNET_CONV, rank=4)
    randomize_lora(unet)
    with_lora = unet_out(unet)
    if merge:
        merge_lora(unet)  # removing with merge=True must not fold twice
    names = remove_lora(unet, merge=merge)
    assert len(names) > 48 and not lora_modules(unet)
    assert list(unet.state_dict()) == original_keys
    layer = unet.get_submodule("input_blocks.3.1.transformer_blocks.0.attn1.to_q")
    assert type(layer) is nn.Linear and type(unet.get_submodule("middle_block.1.proj_in")) is nn.Conv2d
    if merge:
        assert close(unet_out(unet), with_lora)
    else:
        assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in unet.state_dict().items())
    # inject_lora froze the model; removal gives the wrapped weights their requires_grad back
    assert layer.weight.requires_grad


def test_lora_state_dict_round_trip():
    unet = make_unet()
    inject_lora(unet, UNET_ATTENTION, rank=3, alpha=1.5)
    randomize_lora(unet)
    state = lora_state_dict(unet)
    assert len(state) == 3 * 32
    assert state["middle_block.1.transformer_blocks.0.attn1.to_q.alpha"].ndim == 0
    assert all(".lora_" in k or k.endswith(".alpha") for k in state)
    fresh = make_unet()
    inject_lora(fresh, UNET_ATTENTION, rank=3)
    load_lora_state_dict(fresh, state)
    assert lora_modules(fresh)["middle_block.1.transformer_blocks.0.attn1.to_q"].alpha == 1.5
    assert torch.equal(unet_out(fresh), unet_out(unet))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in state.items() if "attn2" not in k})


# ------------------------------------------------------------------------------------------ kohya


def lora_pair(te, config=TINY, rank=4, alpha=2.0, unet_targets=UNET_TRANSFORMER, seed=1):
    """(unet, text encoder) with random LoRA weights, and deep copies of their bases."""
    unet = make_unet(config)
    base_unet, base_te = copy.deepcopy(unet), copy.deepcopy(te)
    inject_lora(unet, unet_targets, rank=rank, alpha=alpha)
    inject_lora(te, TEXT_ENCODER_ALL, rank=rank, alpha=alpha)
    randomize_lora(unet, seed)
    randomize_lora(te, seed + 100)
    return unet, te, base_unet, base_te


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
