"""Hypernetworks (AUTOMATIC1111 style): the MLP layout and options, attaching to a UNet, strength, the
``.pt`` / ``.safetensors`` files (ours and AUTOMATIC1111's, weights-only), and
``sample.py --hypernetwork``."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ldm.io.hypernetwork_file import (
    UnsafeCheckpointError,
    load_hypernetwork,
    read_hypernetwork,
    save_hypernetwork,
)
from ldm.modules.adapters.hypernetwork import (
    ACTIVATIONS,
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkMLP,
    attach_hypernetwork,
    attached_attentions,
    attention_widths,
    detach_hypernetwork,
    dropout_structure_for,
)
from ldm.modules.tiny_unet import tiny_unet_config
from ldm.modules.unet import UNetModel

TINY_UNET = tiny_unet_config(attention_resolutions=[1, 2], num_heads=2)


def unet_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    unet = UNetModel(**TINY_UNET).eval()
    with torch.no_grad():  # wake the zero-initialised output layers so every path carries signal
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 64, generator=gen)
    return unet, (x, torch.tensor([10, 600]), context)


def randomise(net: torch.nn.Module, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


# -- the module ----------------------------------------------------------------------------------------------


def test_layer_layout_matches_automatic1111_keys():
    # [1, 2, 2, 1], relu, layer norm, dropout with last_layer_dropout=False -> AUTOMATIC1111's Sequential:
    # Linear ReLU LayerNorm Dropout | Linear ReLU LayerNorm | Linear LayerNorm (no activation on the output)
    dropout = dropout_structure_for([1, 2, 2, 1], use_dropout=True, last_layer_dropout=False)
    assert dropout == [0.0, 0.3, 0.0, 0.0]
    mlp = HypernetworkMLP(8, [1, 2, 2, 1], "relu", layer_norm=True, dropout_structure=dropout)
    kinds = [type(m).__name__ for m in mlp.linear]
    assert kinds == [
        "Linear",
        "ReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "ReLU",
        "LayerNorm",
        "Linear",
        "LayerNorm",
    ]
    assert sorted(mlp.state_dict()) == sorted(
        f"linear.{i}.{p}" for i in (0, 2, 4, 6, 7, 8) for p in ("weight", "bias")
    )
    assert dropout_structure_for([1, 2, 2, 1], True, True) == [0.0, 0.3, 0.3, 0.0]
    assert [type(m).__name__ for m in HypernetworkMLP(8, [1, 2, 1], "tanh", activate_output=True).linear] == [
        "Linear",
        "Tanh",
        "Linear",
        "Tanh",
    ]
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish  # AUTOMATIC1111's meaning of "swish"
    # Normal init: weights N(0, 0.01), biases 0 -> an untrained MLP is close to the identity
    weights = torch.cat([m.weight.flatten() for m in HypernetworkMLP(256).linear])
    assert 0.005 < weights.std() < 0.02 and all(m.bias.abs().max() == 0 for m in HypernetworkMLP(8).linear)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds_and_runs(activation):
    mlp = HypernetworkMLP(8, [1, 2, 1], activation, activate_output=True, layer_norm=True)
    randomise(mlp)
    x = torch.randn(2, 3, 8)
    y = mlp(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(y, x)
    y.sum().backward()


@pytest.mark.parametrize("structure", [[1, 1], [1, 2, 1], [1, 0.5, 1], [1, 1.5, 2, 1], [1, 2, 4, 2, 1]])
@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
def test_every_structure_and_init_builds_and_runs(structure, weight_init):
    dropout = dropout_structure_for(structure, use_dropout=True, last_layer_dropout=True)
    net = Hypernetwork(
        [8, 12], structure, "leakyrelu", weight_init, layer_norm=True, dropout_structure=dropout
    )
    linears = [m for m in net.pair(8)[0].linear if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [int(8 * s) for s in structure[1:]]
    net.train()
    k, v = net(torch.randn(2, 3, 12))
    assert k.shape == v.shape == (2, 3, 12)
    assert net(torch.randn(1, 2, 5))[0].shape == (1, 2, 5)  # an uncovered width passes through


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="start and end with 1"):
        HypernetworkMLP(8, [2, 1])
    with pytest.raises(ValueError, match="unknown hypernetwork activation 'nope'"):
        HypernetworkMLP(8, [1, 2, 1], "nope")
    with pytest.raises(ValueError, match="unknown hypernetwork weight_init"):
        HypernetworkMLP(8, [1, 2, 1], weight_init="orthogonal")
    with pytest.raises(ValueError, match="one probability"):
        HypernetworkMLP(8, [1, 2, 1], dropout_structure=[0, 0.3])


# -- on a UNet -----------------------------------------------------------------------------------------------


def test_strength_zero_and_zero_last_layer_leave_the_unet_unchanged():
    unet, args = unet_and_inputs()
    with torch.no_grad():
        reference = unet(*args)
        net = Hypernetwork(attention_widths(unet))
        randomise(net)
        names = attach_hypernetwork(unet, net)
        assert names and all(n.endswith("attn2") for n in names)
        changed = unet(*args)
        assert (changed - reference).abs().max() > 1e-3  # the hypernetwork acts...
        net.strength = 0.0
        # ...and strength 0 switches it off
        torch.testing.assert_close(unet(*args), reference, rtol=0, atol=0)
        net.strength = 0.5
        half = unet(*args)
        assert not torch.allclose(half, reference) and not torch.allclose(half, changed)

        zero = Hypernetwork(attention_widths(unet), [1, 2, 1], "relu", "KaimingNormal", zero_last_layer=True)
        attach_hypernetwork(unet, zero)
        torch.testing.assert_close(unet(*args), reference, rtol=0, atol=0)
        assert detach_hypernetwork(unet) == len(names) and not attached_attentions(unet)
        torch.testing.assert_close(unet(*args), reference, rtol=0, atol=0)


def test_self_attention_by_width_as_automatic1111():
    unet, args = unet_and_inputs()
    assert attention_widths(unet) == [64] and attention_widths(unet, self_attention=True) == [32, 64]
    net = Hypernetwork([64])
    randomise(net)
    with torch.no_grad():
        cross_only = (attach_hypernetwork(unet, net), unet(*args))
        everywhere = (attach_hypernetwork(unet, net, self_attention=True), unet(*args))
    assert all(n.endswith("attn2") for n in cross_only[0])
    # width 64 also covers the 64-channel level's self-attention (attn1), and only that one
    assert sorted(set(everywhere[0]) - set(cross_only[0])) == [
        n for n in everywhere[0] if n.endswith("attn1")
    ]
    assert everywhere[0] != cross_only[0] and not torch.allclose(everywhere[1], cross_only[1])
    with pytest.raises(ValueError, match=r"covers widths \[768\].*\[64\] wide"):
        attach_hypernetwork(unet, Hypernetwork([768]))


def test_gradients_reach_only_the_hypernetwork():
    unet, args = unet_and_inputs()
    unet.requires_grad_(False)
    net = Hypernetwork([64], [1, 2, 1], "relu")
    attach_hypernetwork(unet, net)
    unet(*args).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_a_deep_copied_unet_shares_the_live_hypernetwork():
    import copy

    unet, args = unet_and_inputs()
    net = Hypernetwork([64])
    attach_hypernetwork(unet, net)
    twin = copy.deepcopy(unet)
    randomise(net)
    with torch.no_grad():
        torch.testing.assert_close(twin(*args), unet(*args))


# -- files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_round_trip(tmp_path, suffix):
    dropout = dropout_structure_for([1, 2, 2, 1], True, False)
    net = Hypernetwork(
        [64, 768], [1, 2, 2, 1], "elu", "XavierNormal", layer_norm=True, dropout_structure=dropout
    )
    randomise(net)
    path = save_hypernetwork(
        tmp_path / f"hn{suffix}",
        net,
        name="stars",
        step=42,
        sd_checkpoint="abc123",
        sd_checkpoint_name="base.ckpt",
    )
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary left behind
    back, file = load_hypernetwork(path)
    assert file.info == {
        "name": "stars",
        "step": 42,
        "sd_checkpoint": "abc123",
        "sd_checkpoint_name": "base.ckpt",
        "optional_info": None,
    }
    assert (
        file.layer_structure,
        file.activation_func,
        file.weight_initialization,
        file.is_layer_norm,
        file.dropout_structure,
        file.activate_output,
        file.self_attention,
    ) == ([1, 2, 2, 1], "elu", "XavierNormal", True, dropout, False, False)
    net.eval()
    x = torch.randn(2, 3, 768)
    for a, b in zip(net(x), back(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pt_is_automatic1111_layout_with_plain_types(tmp_path):
    net = Hypernetwork([768], [1, 2, 1], "relu")
    path = save_hypernetwork(tmp_path / "hn.pt", net, name="stars", step=7)
    payload = torch.load(path, weights_only=True)  # plain types only: no unpickling of our classes
    assert set(payload) == {
        768,
        "layer_structure",
        "activation_func",
        "is_layer_norm",
        "weight_initialization",
        "use_dropout",
        "dropout_structure",
        "last_layer_dropout",
        "activate_output",
        "self_attention",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
        "optional_info",
    }
    k_state, v_state = payload[768]
    assert type(payload[768]) is tuple and type(k_state) is dict
    assert sorted(k_state) == ["linear.0.bias", "linear.0.weight", "linear.2.bias", "linear.2.weight"]
    assert k_state["linear.0.weight"].shape == (1536, 768) and v_state["linear.2.weight"].shape == (768, 1536)
    assert (payload["layer_structure"], payload["activation_func"], payload["name"], payload["step"]) == (
        [1, 2, 1],
        "relu",
        "stars",
        7,
    )


def test_reads_automatic1111_files_with_their_defaults(tmp_path):
    # as AUTOMATIC1111 saves: nn.Module.state_dict() OrderedDicts, float layer_structure
    source = Hypernetwork(
        [768],
        [1, 2, 1],
        "swish",
        layer_norm=True,
        dropout_structure=dropout_structure_for([1, 2, 1], True, True),
    )
    randomise(source)
    payload = {
        768: (source.pair(768)[0].state_dict(), source.pair(768)[1].state_dict()),
        "layer_structure": [1.0, 2.0, 1.0],
        "activation_func": "swish",
        "is_layer_norm": True,
        "weight_initialization": "Normal",
        "use_dropout": True,
        "last_layer_dropout": True,
        "activate_output": False,
        "name": "theirs",
        "step": 1000,
        "sd_checkpoint": "7460a6fa",
        "sd_checkpoint_name": "sd-v1-4",
    }
    torch.save(payload, tmp_path / "theirs.pt")
    net, file = load_hypernetwork(tmp_path / "theirs.pt")
    # theirs: every attention by width
    assert file.dropout_structure == [0.0, 0.3, 0.0] and file.self_attention
    x = torch.randn(1, 4, 768)
    source.eval()
    torch.testing.assert_close(net(x)[1], source(x)[1])

    # the oldest files: linear1/linear2 keys, no options at all (activation none, activate_output default
    # True)
    old = {
        "linear1.weight": torch.randn(1536, 768),
        "linear1.bias": torch.zeros(1536),
        "linear2.weight": torch.randn(768, 1536),
        "linear2.bias": torch.zeros(768),
    }
    torch.save({768: (old, dict(old))}, tmp_path / "old.pt")
    net, file = load_hypernetwork(tmp_path / "old.pt")
    assert file.info["name"] == "old" and file.layer_structure == [1, 2, 1]
    torch.testing.assert_close(net.pair(768)[0].linear[1].weight, old["linear2.weight"])


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_pickles_that_need_code_and_mismatched_files(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({768: _Payload()}, handle)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        read_hypernetwork(tmp_path / "evil.pt")
    torch.save({"layer_structure": [1, 2, 1]}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no hypernetwork layers"):
        read_hypernetwork(tmp_path / "empty.pt")
    net = Hypernetwork([64], [1, 2, 1])
    payload = torch.load(save_hypernetwork(tmp_path / "a.pt", net), weights_only=True)
    payload["layer_structure"] = [1, 3, 1]
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(
        ValueError, match=r"k MLP for width 64 does not match layer_structure \[1.0, 3.0, 1.0\]"
    ):
        load_hypernetwork(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError):
        read_hypernetwork(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"use a \.pt"):
        save_hypernetwork(tmp_path / "a.bin", net)


# -- sample.py -----------------------------------------------------------------------------------------------


def tiny_lightning_checkpoint(path: Path) -> Path:
    import hydra
    from omegaconf import OmegaConf

    config = {
        "_target_": "ldm.models.latent_diffusion.LatentDiffusion",
        "unet": {
            "_target_": "ldm.modules.unet.UNetModel",
            **TINY_UNET,
            "channel_mult": [1, 2],
            "attention_resolutions": [1, 2],
        },
        "vae": {
            "_target_": "ldm.modules.vae.AutoencoderKL",
            "embed_dim": 4,
            "ch": 8,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "resolution": 16,
            "norm_groups": 4,
        },
        "text_encoder": {
            "_target_": "ldm.modules.text_encoder.CLIPTextEncoder.tiny",
            "hidden_size": 64,
            "num_layers": 1,
            "num_heads": 2,
        },
        "schedule": {"_target_": "ldm.diffusion.DiffusionSchedule.from_config", "kind": "scaled_linear"},
        "sampler": {"_target_": "ldm.diffusion.DDIMSampler", "steps": 2},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
        "scale_factor": 0.5,
        "ema_decay": None,
    }
    model = hydra.utils.instantiate(OmegaConf.create(config), _convert_="all")
    randomise(model.unet, 0.05)
    torch.save({"state_dict": model.state_dict(), "model_config": config, "global_step": 1}, path)
    return path


def test_sample_py_applies_a_hypernetwork_with_strength(tmp_path):
    import numpy as np
    from PIL import Image

    import sample

    ckpt = tiny_lightning_checkpoint(tmp_path / "last.ckpt")
    net = Hypernetwork([64], [1, 2, 1], "relu")
    randomise(net, 1.0)
    hn_file = save_hypernetwork(tmp_path / "stars.pt", net, name="stars")

    def run(out: str, *extra: str) -> np.ndarray:
        sample.main(
            [
                "--ckpt",
                str(ckpt),
                "--prompt",
                "a red star on a blue background",
                "--n",
                "1",
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "--device",
                "cpu",
                "--no-ema",
                "--out",
                str(tmp_path / out),
                *extra,
            ]
        )
        return np.asarray(Image.open(next((tmp_path / out).glob("000_*.png"))), dtype=np.int16)

    plain = run("plain")
    applied = run("applied", "--hypernetwork", str(hn_file))
    off = run("off", "--hypernetwork", f"{hn_file}:0")
    assert np.abs(applied - plain).max() > 0
    np.testing.assert_array_equal(off, plain)


def test_fidelity_benchmark_scores_base_and_hypernetwork(tmp_path):
    from tests.conftest import load_script

    fidelity = load_script("benchmarks/fidelity.py")
    ckpt = tiny_lightning_checkpoint(tmp_path / "last.ckpt")
    hn_file = save_hypernetwork(tmp_path / "stars.pt", Hypernetwork([64]), name="stars")
    results = fidelity.main(
        [
            "--ckpt",
            str(ckpt),
            "--hypernetwork",
            f"{hn_file}:0.5",
            "--samplers",
            "dpmpp_2m-20",
            "--n",
            "2",
            "--grid-dir",
            str(tmp_path / "grids"),
        ]
    )
    assert set(results) == {
        (s, "dpmpp_2m-20", v) for s in ("concept", "known") for v in ("base", "base+hypernetwork")
    }
    assert (tmp_path / "grids" / "concept_dpmpp_2m-20_base+hypernetwork.png").is_file()


def test_method_refuses_widths_that_would_never_train():
    """model.method.widths with a self-attention width and self_attention=false: that MLP would be saved
    untrained and AUTOMATIC1111 would apply it (issue 27); refused in one line naming the fix."""
    from ldm.models.finetune.hypernetwork import Hypernetwork as HypernetworkMethod

    unet, _ = unet_and_inputs()
    holder = torch.nn.Module()
    holder.unet = unet
    with pytest.raises(ValueError, match=r"\[32\] are only self-attention widths.*self_attention=true"):
        HypernetworkMethod(widths=[32, 64]).attach(holder)
    with pytest.raises(ValueError, match=r"no attention layer of this UNet takes \[100\]"):
        HypernetworkMethod(widths=[64, 100], self_attention=True).attach(holder)
    method = HypernetworkMethod(widths=[32, 64], self_attention=True)  # both train: both are saved
    method.attach(holder)
    assert sorted(method.network.widths) == [32, 64]
    method = HypernetworkMethod()  # default: the widths the UNet's cross-attention takes
    method.attach(holder)
    assert method.network.widths == [64]
