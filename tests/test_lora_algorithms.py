"""Adapter algorithms (ldm/modules/adapters/{loha,lokr,dora,algorithms}.py) and their files
(ldm/io/lycoris_lora.py, peft_dora.py): each layer starts as the base, merges/unmerges exactly and honours its
multiplier; LyCORIS files round-trip through our loader and agree with the ``lycoris-lora`` package (its
loader reads our files, ours reads the files it writes); DoRA agrees with ``peft`` both ways; algorithms we
do not read fail with one error naming them."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.io.kohya_lora import kohya_module_map
from ldm.io.lora_any import load_lora, lora_format
from ldm.io.lycoris_lora import save_lycoris_lora
from ldm.io.peft_dora import save_peft_dora
from ldm.io.peft_lora import peft_module_map
from ldm.io.safe_load import read_safetensors_metadata
from ldm.modules.adapters import UNET_CONV, UNET_TRANSFORMER, inject_lora, lora_modules, remove_lora
from ldm.modules.adapters.algorithms import adapter_factory
from ldm.modules.adapters.lokr import factorization
from tests.lora_parts import make_unet, unet_inputs, unet_out
from tests.test_sample_cli import single_file  # noqa: F401 - a fixture

ALGOS = ["lora", "loha", "lokr", "dora"]
TARGETS = UNET_TRANSFORMER + UNET_CONV


def adapted_unet(algo, rank=4, alpha=2.0, seed=0, **kwargs):
    """(tiny UNet with random ``algo`` adapters on attention, feed-forward and convs, a copy of its base)."""
    unet = make_unet()
    base = copy.deepcopy(unet)
    factory = adapter_factory(algo, rank, alpha, conv_rank=2, conv_alpha=1.0, **kwargs)
    inject_lora(unet, TARGETS, factory=factory)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(unet).values():
            for p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return unet, base


# ------------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_starts_as_base_merges_exactly_and_scales(algo, kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 8) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 12) if kind == "linear" else torch.randn(2, 6, 5, 5)
    original = copy.deepcopy(base)
    layer = adapter_factory(algo, rank=2, alpha=1.0, factor=2)(base)
    assert layer.algo == algo
    torch.testing.assert_close(layer(x), original(x), rtol=0, atol=1e-6)  # the usual init: delta 0
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    adapted = layer(x)
    assert (adapted - original(x)).abs().max() > 1e-3
    layer.merge()
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)  # merged == forward
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original.weight, rtol=0, atol=1e-6)
    layer.multiplier = 0.5  # W + 0.5 * delta (DoRA: halfway between W and W')
    half = layer(x)
    torch.testing.assert_close(half, (adapted + original(x)) / 2, rtol=1e-5, atol=1e-5)
    layer.multiplier = 0.0
    torch.testing.assert_close(layer(x), original(x), rtol=0, atol=1e-6)
    assert layer.weight.grad is None and all(p.requires_grad for p in layer.adapter_parameters())


def test_lokr_factorization_and_shapes_follow_lycoris():
    # LyCORIS's documented examples: 128 -> (8, 16) at -1, (4, 32) at 4; 250 -> (10, 25) at -1
    assert (
        factorization(128) == (8, 16) and factorization(128, 4) == (4, 32) and factorization(250) == (10, 25)
    )
    layer = adapter_factory("lokr", rank=2, factor=4)(nn.Linear(64, 32))
    shapes = {k: tuple(v.shape) for k, v in layer.adapter_tensors().items()}
    assert shapes == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 16)}
    full = adapter_factory("lokr", rank=2, factor=4, full_matrix=True)(nn.Linear(64, 32))
    assert {k: tuple(v.shape) for k, v in full.adapter_tensors().items()} == {
        "lokr_w1": (4, 4),
        "lokr_w2": (8, 16),
    }
    assert full.scale == 1.0  # both factors full: LyCORIS ignores alpha


def test_conv_rank_and_alpha_apply_to_3x3_convs_only():
    unet, _ = adapted_unet("loha", rank=4, alpha=2.0)
    layers = lora_modules(unet)
    conv3 = [l for l in layers.values() if l.weight.ndim == 4 and l.weight.shape[-1] == 3]
    other = [l for l in layers.values() if not (l.weight.ndim == 4 and l.weight.shape[-1] == 3)]
    assert conv3 and other
    assert {(l.rank, l.alpha) for l in conv3} == {(2, 1.0)} and {(l.rank, l.alpha) for l in other} == {
        (4, 2.0)
    }
    remove_lora(unet)
    assert not lora_modules(unet)


# ------------------------------------------------------------------------------------------ our files


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_lycoris_file_layout_and_round_trip(algo, tmp_path):
    unet, base = adapted_unet(algo)
    expected = unet_out(unet)
    path = save_lycoris_lora(tmp_path / f"{algo}.safetensors", unet, factor=-1)
    tensors, meta = load_file(path), read_safetensors_metadata(path)
    suffixes = {k.partition(".")[2] for k in tensors}
    want = {
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    }[algo]
    assert suffixes == want and all(k.startswith("lora_unet_") for k in tensors)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    assert args["algo"] == ("lora" if algo == "dora" else algo) and args["conv_dim"] == "2"
    assert args.get("dora_wd") == ("True" if algo == "dora" else None)
    assert lora_format(tensors) == "lycoris"
    for merge in (False, True):  # injected layers, or folded into the weights
        fresh = copy.deepcopy(base)
        summary = load_lora(path, unet=fresh, merge=merge)
        assert summary["algo"] == [algo] and summary["modules"] == len(lora_modules(unet))
        torch.testing.assert_close(unet_out(fresh), expected, rtol=1e-5, atol=1e-5)
    # stacking at 0.5 + 0.5 on the merged copy == the adapter at 1.0 (LoHa/LoKr deltas do not depend on W)
    if algo != "dora":
        fresh = copy.deepcopy(base)
        load_lora(path, unet=fresh, merge=True, multiplier=0.5)
        load_lora(path, unet=fresh, merge=True, multiplier=0.5)
        torch.testing.assert_close(unet_out(fresh), expected, rtol=1e-5, atol=1e-5)


def test_dora_peft_layout_round_trip(tmp_path):
    unet, base = adapted_unet("dora")
    path = save_peft_dora(tmp_path / "dora_peft.safetensors", unet)
    tensors = load_file(path)
    assert {k.rpartition(".")[2] if "magnitude" in k else k.split(".")[-2] for k in tensors} == {
        "lora_A",
        "lora_B",
        "lora_magnitude_vector",
    }
    magnitude = next(v for k, v in tensors.items() if k.endswith("lora_magnitude_vector"))
    assert magnitude.ndim == 1
    fresh = copy.deepcopy(base)
    summary = load_lora(path, unet=fresh, merge=True)
    assert summary["format"] == "peft" and summary["algo"] == ["dora"]
    torch.testing.assert_close(unet_out(fresh), unet_out(unet), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "suffixes,named",
    [
        (["diff", "diff_b"], "full"),
        (["a1.weight", "a2.weight", "b1.weight", "b2.weight"], "glora"),
        (["weight", "on_input"], "ia3"),
        (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"], "Tucker"),
    ],
)
def test_lycoris_algorithms_we_do_not_read_are_named(tmp_path, suffixes, named):
    unet = make_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "other.safetensors"
    save_file({f"{name}.{s}": torch.zeros(4, 4) for s in suffixes}, path)
    with pytest.raises(ValueError, match=rf"{named}.*is not read; we read lora/locon.*loha.*lokr.*dora"):
        load_lora(path, unet=unet, merge=True)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # nothing changed


def test_lycoris_metadata_naming_an_unread_algorithm(tmp_path):
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "ia3.safetensors"
    save_file({f"{name}.weight": torch.zeros(64)}, path, {"ss_network_args": json.dumps({"algo": "ia3"})})
    with pytest.raises(ValueError, match="LyCORIS algorithm 'ia3' .* is not read"):
        load_lora(path, unet=make_unet(), merge=True)


# ------------------------------------------------------------------------------------------ lycoris-lora


def to_lycoris_names(tensors, unet):
    """Our kohya-named tensors -> the ``lycoris_<module>`` names LyCORIS's generic loader uses on ``unet``."""
    ours = {k: v for k, (_, v) in kohya_module_map(unet).items()}
    out = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        out[f"lycoris_{ours[name].replace('.', '_')}.{suffix}"] = value
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_reads_our_files(algo, tmp_path):
    lycoris = pytest.importorskip("lycoris")
    unet, base = adapted_unet(algo, rank=4, alpha=2.0)
    path = save_lycoris_lora(tmp_path / "ours.safetensors", unet)
    weights = to_lycoris_names(load_file(path), base)
    theirs = copy.deepcopy(base)
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, theirs, weights_sd=weights)
    assert len(network.loras) == len(lora_modules(unet))
    network.apply_to()  # their forward: how they train and sample
    torch.testing.assert_close(unet_out(theirs), unet_out(unet), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_merge_equals_ours_at_alpha_equal_rank(algo, tmp_path):
    """LyCORIS 4.1's ``merge_to`` applies alpha/rank twice for LoHa/LoKr (its forward, AUTOMATIC1111 and
    ComfyUI apply it once), so weights are compared where alpha = rank."""
    lycoris = pytest.importorskip("lycoris")
    unet, base = adapted_unet(algo, rank=4, alpha=4.0)
    for layer in lora_modules(unet).values():
        layer.alpha = float(layer.rank)
    path = save_lycoris_lora(tmp_path / "ours.safetensors", unet)
    theirs = copy.deepcopy(base)
    network, _ = lycoris.create_lycoris_from_weights(
        1.0, None, theirs, weights_sd=to_lycoris_names(load_file(path), base)
    )
    network.merge_to(1.0)
    ours = copy.deepcopy(base)
    load_lora(path, unet=ours, merge=True)
    for (key, mine), (_, other) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(mine, other, rtol=0, atol=1e-5, msg=key)


LYCORIS_ARGS = {
    "lora": {"algo": "lora"},
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr", "factor": 4},
    "dora": {"algo": "lora", "dora_wd": True},
    "dora_on_input": {"algo": "lora", "dora_wd": True, "wd_on_output": False},  # AUTOMATIC1111's axis
}


@pytest.mark.parametrize("algo", [*ALGOS, "dora_on_input"])
def test_files_lycoris_writes_load_into_ours(algo, tmp_path):
    lycoris = pytest.importorskip("lycoris")
    base = make_unet()
    theirs = copy.deepcopy(base)
    network = lycoris.create_lycoris(theirs, 1.0, linear_dim=4, linear_alpha=2.0, **LYCORIS_ARGS[algo])
    network.apply_to()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = {k: v for k, v in network.state_dict().items() if k.partition(".")[2] != "scalar"}
    kohya_name = {ours.replace(".", "_"): name for name, (_, ours) in kohya_module_map(base).items()}
    renamed = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        renamed[f"{kohya_name[module.removeprefix('lycoris_')]}.{suffix}"] = value.detach()
    path = tmp_path / "theirs.safetensors"
    save_file(renamed, path)
    ours = copy.deepcopy(base)
    summary = load_lora(path, unet=ours, merge=True)
    assert summary["algo"] == [algo.removesuffix("_on_input")] and summary["modules"] == len(network.loras)
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ peft (DoRA)


def peft_dora_model(base, targets, rank=4):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets, use_dora=True, init_lora_weights=True
    )
    return get_peft_model(copy.deepcopy(base), config)


def test_peft_reads_our_dora_and_we_read_theirs(tmp_path):
    pytest.importorskip("peft")
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    unet, base = adapted_unet("dora", rank=4, alpha=2.0)
    names = {v[1]: k.removeprefix("unet.") for k, v in peft_module_map(base).items()}
    ours_to_diffusers = {n: names[n] for n in lora_modules(unet)}
    diffusers_to_ours = {v: k for k, v in ours_to_diffusers.items()}
    targets = [n for n in ours_to_diffusers if isinstance(base.get_submodule(n), nn.Linear)]
    # ours -> PEFT: the file's lora_A / lora_B / lora_magnitude_vector into a PEFT DoRA model of the same base
    only_linear = copy.deepcopy(base)
    inject_lora(only_linear, targets, factory=adapter_factory("dora", 4, 2.0))
    with torch.no_grad():
        for name, layer in lora_modules(only_linear).items():
            for suffix, p in layer.adapter_tensors().items():
                p.copy_(lora_modules(unet)[name].adapter_tensors()[suffix])
    path = save_peft_dora(tmp_path / "ours.safetensors", only_linear)
    state = {}
    for key, value in load_file(path).items():
        module, _, suffix = key.removeprefix("unet.").partition(".lora_")
        state[f"base_model.model.{diffusers_to_ours[module]}.lora_{suffix}"] = value
    peft_model = peft_dora_model(base, targets)
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(peft_model(*unet_inputs()), unet_out(only_linear), rtol=1e-5, atol=1e-5)
    # PEFT -> ours: their (randomised) DoRA state, renamed to diffusers keys, read by load_lora
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs = {}
    for key, value in get_peft_model_state_dict(peft_model).items():
        module, _, suffix = key.removeprefix("base_model.model.").partition(".lora_")
        theirs[f"unet.{ours_to_diffusers[module]}.lora_{suffix}"] = value
    save_file(theirs, tmp_path / "theirs.safetensors")
    ours = copy.deepcopy(base)
    assert load_lora(tmp_path / "theirs.safetensors", unet=ours, merge=True)["algo"] == ["dora"]
    with torch.no_grad():
        torch.testing.assert_close(unet_out(ours), peft_model(*unet_inputs()), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ the scripts


def test_convert_bakes_lycoris_files_as_sample_applies_them(single_file, tmp_path):  # noqa: F811
    """convert.py --lora loha:0.8 --lora dora bakes what sample.py --lora (same files) samples with."""
    from ldm.models.base_loader import load_base_model
    from tests.test_sample_cli import PROMPTS, convert_main, pixels, run

    files = []
    for seed, algo in ((1, "loha"), (2, "dora")):
        components = load_base_model(single_file)
        factory = adapter_factory(algo, rank=2, alpha=1.0)
        layers = inject_lora(components.unet, ["*attn2.to_v", "*ff.net.2", "*in_layers.2"], factory=factory)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in layers.values():
                for p in layer.adapter_parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        files.append(save_lycoris_lora(tmp_path / f"{algo}.safetensors", components.unet))
    loras = ["--lora", f"{files[0]}:0.8", "--lora", str(files[1])]
    out = tmp_path / "merged.safetensors"
    merged = convert_main()(["--base", str(single_file), *loras, "--out", str(out), "--fp32"])
    common = ["--prompt", PROMPTS[0], "--n", "1", "--sampler", "euler"]
    from_merged = run(merged, tmp_path / "merged", *common)
    with_loras = run(single_file, tmp_path / "loras", *common, *loras)
    plain = run(single_file, tmp_path / "plain", *common)
    assert np.abs(pixels(from_merged[0]) - pixels(with_loras[0])).max() <= 1
    assert np.abs(pixels(from_merged[0]) - pixels(plain[0])).max() > 2


def test_method_options_are_checked():
    from ldm.models.finetune.lora import LoRA

    with pytest.raises(ValueError, match="model.method.algo must be one of lora, locon, loha, lokr, dora"):
        LoRA(algo="glora")
    with pytest.raises(
        ValueError, match="algo=loha has no PEFT layout: use model.method.export_format=kohya"
    ):
        LoRA(algo="loha", export_format="peft")
    assert "*.in_layers.2" in LoRA(algo="locon", unet_targets=["UNET_ATTENTION"]).targets["unet"]


def test_lora_step_benchmark_per_algorithm():
    """``benchmarks/lora_step.py --algo``'s measuring code: each algorithm trains, with its file size."""
    from tests.conftest import load_script

    lora_step = load_script("benchmarks/lora_step.py")
    runs = {
        algo: lora_step.run_variant("lora", "embedded", 32, 1, 1, "cpu", algo) for algo in ("lora", "loha")
    }
    assert runs["loha"]["variant"] == "loha" and runs["loha"]["trainable"] == runs["lora"]["trainable"]
    assert all(r["file_bytes"] > 4 * r["trainable"] and r["median_s"] > 0 for r in runs.values())
