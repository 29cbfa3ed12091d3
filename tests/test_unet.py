"""Tests of the LDM-layout conditional UNet (ldm/modules/unet.py, ldm/modules/attention.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.io.diffusers_config import diffusers_config_from_ldm
from ldm.io.diffusers_names import diffusers_unet_to_ldm
from ldm.modules import attention as attention_module
from ldm.modules import unet as unet_module
from ldm.modules.attention import CrossAttention
from ldm.modules.tiny_unet import tiny_unet_config
from ldm.modules.unet import UNetModel, timestep_embedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "unet"

TINY = tiny_unet_config()


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Randomise every parameter so that zero-initialised output layers carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def inputs(batch=2, res=(8, 8), context_dim=64, length=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *res, generator=gen)
    t = torch.tensor([1, 999, 500, 17][:batch])
    context = torch.randn(batch, length, context_dim, generator=gen)
    return x, t, context


@pytest.mark.parametrize(
    "overrides, res",
    [
        ({}, (8, 8)),
        ({}, (16, 12)),
        ({}, (7, 9)),  # odd sizes: upsampling matches the skip sizes
        ({"channel_mult": (1, 2, 3), "attention_resolutions": (1, 4), "num_res_blocks": 2}, (8, 8)),
        ({"channel_mult": (1, 2, 3), "attention_resolutions": (2,)}, (12, 20)),
        ({"channel_mult": (2,), "attention_resolutions": (1,), "out_channels": 8}, (6, 6)),
        (
            {
                "num_heads": -1,
                "num_head_channels": 16,
                "use_linear_in_transformer": True,
                "transformer_depth": 2,
            },
            (8, 8),
        ),
        ({"use_scale_shift_norm": True, "in_channels": 9}, (8, 8)),
    ],
)
def test_output_shape(overrides, res):
    kwargs = {**TINY, **overrides}
    model = UNetModel(**kwargs)
    x, t, context = inputs(res=res)
    x = torch.randn(2, kwargs.get("in_channels", 4), *res)
    out = model(x, t, context)
    assert out.shape == (2, kwargs.get("out_channels", 4), *res)


def test_float_and_scalar_timesteps():
    model = UNetModel(**TINY)
    perturb_zero_init(model)
    x, _, context = inputs()
    a = model(x, torch.tensor([250.0, 250.0]), context)
    b = model(x, torch.tensor(250), context)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dim", [32, 7])
def test_timestep_embedding_closed_form(dim):
    t = torch.tensor([0, 1, 10, 999, 0.5])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    expected = torch.zeros(len(t), dim, dtype=torch.float64)
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            expected[row, i] = math.cos(step * freq)
            expected[row, half + i] = math.sin(step * freq)
    assert emb.shape == (len(t), dim)
    torch.testing.assert_close(emb.double(), expected, atol=1e-4, rtol=0)


def test_zero_init_output_layers():
    model = UNetModel(**TINY)
    assert torch.count_nonzero(model.out[2].weight) == 0
    x, t, context = inputs()
    assert torch.count_nonzero(model(x, t, context)) == 0
    for name, p in model.named_parameters():
        if name.endswith(("out_layers.3.weight", "proj_out.weight")):
            assert torch.count_nonzero(p) == 0, name


def test_context_influences_output():
    model = UNetModel(**TINY).eval()
    perturb_zero_init(model)
    x, t, context = inputs()
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, t, context + torch.randn_like(context))
        c = model(x, t, context)
    torch.testing.assert_close(a, c)
    assert (a - b).abs().max() > 1e-3


def grads(model, x, t, context):
    model.zero_grad(set_to_none=True)
    model(x, t, context).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_gradients(monkeypatch):
    model = UNetModel(**{**TINY, "num_res_blocks": 2}).train()
    perturb_zero_init(model)
    x, t, context = inputs()
    reference = grads(model, x, t, context)

    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(attention_module, "checkpoint", counting_checkpoint)
    model.enable_gradient_checkpointing()
    checkpointed = grads(model, x, t, context)
    n_res = sum(isinstance(m, unet_module.ResBlock) for m in model.modules())
    n_blocks = sum(isinstance(m, attention_module.BasicTransformerBlock) for m in model.modules())
    assert len(calls) == n_res + n_blocks and set(calls) == {False}
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)

    model.enable_gradient_checkpointing(False)
    calls.clear()
    grads(model, x, t, context)
    assert not calls
    # The constructor flag does the same.
    assert all(
        m.use_checkpoint
        for m in UNetModel(**{**TINY, "use_checkpoint": True}).modules()
        if isinstance(m, (unet_module.ResBlock, attention_module.BasicTransformerBlock))
    )


# --- Stable Diffusion v1 layout, written out independently of the model code -------------------


def _conv(name, c_out, c_in, k):
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def _vec(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _linear(name, c_out, c_in, bias=True):
    out = {f"{name}.weight": (c_out, c_in)}
    if bias:
        out[f"{name}.bias"] = (c_out,)
    return out


def _res(prefix, c_in, c_out, emb=1280):
    keys = {
        **_vec(f"{prefix}.in_layers.0", c_in),
        **_conv(f"{prefix}.in_layers.2", c_out, c_in, 3),
        **_linear(f"{prefix}.emb_layers.1", c_out, emb),
        **_vec(f"{prefix}.out_layers.0", c_out),
        **_conv(f"{prefix}.out_layers.3", c_out, c_out, 3),
    }
    if c_in != c_out:
        keys.update(_conv(f"{prefix}.skip_connection", c_out, c_in, 1))
    return keys


def _transformer(prefix, c, context_dim=768, linear=False):
    proj = (lambda n, o, i: _linear(n, o, i)) if linear else (lambda n, o, i: _conv(n, o, i, 1))
    b = f"{prefix}.transformer_blocks.0"
    return {
        **_vec(f"{prefix}.norm", c),
        **proj(f"{prefix}.proj_in", c, c),
        **_linear(f"{b}.attn1.to_q", c, c, bias=False),
        **_linear(f"{b}.attn1.to_k", c, c, bias=False),
        **_linear(f"{b}.attn1.to_v", c, c, bias=False),
        **_linear(f"{b}.attn1.to_out.0", c, c),
        **_linear(f"{b}.ff.net.0.proj", 8 * c, c),
        **_linear(f"{b}.ff.net.2", c, 4 * c),
        **_linear(f"{b}.attn2.to_q", c, c, bias=False),
        **_linear(f"{b}.attn2.to_k", c, context_dim, bias=False),
        **_linear(f"{b}.attn2.to_v", c, context_dim, bias=False),
        **_linear(f"{b}.attn2.to_out.0", c, c),
        **_vec(f"{b}.norm1", c),
        **_vec(f"{b}.norm2", c),
        **_vec(f"{b}.norm3", c),
        **proj(f"{prefix}.proj_out", c, c),
    }


def sd_unet_layout(context_dim=768, linear=False):
    """{name: shape} of the SD v1/v2 UNet, block by block as in the released checkpoints."""
    # (input channels, output channels, has attention) of every input block's ResBlock; "down" marks
    # a Downsample block.
    inputs_ = [
        (320, 320, 1),
        (320, 320, 1),
        "down",
        (320, 640, 1),
        (640, 640, 1),
        "down",
        (640, 1280, 1),
        (1280, 1280, 1),
        "down",
        (1280, 1280, 0),
        (1280, 1280, 0),
    ]
    outputs = [
        (2560, 1280, 0),
        (2560, 1280, 0),
        (2560, 1280, 0, "up"),
        (2560, 1280, 1),
        (2560, 1280, 1),
        (1920, 1280, 1, "up"),
        (1920, 640, 1),
        (1280, 640, 1),
        (960, 640, 1, "up"),
        (960, 320, 1),
        (640, 320, 1),
        (640, 320, 1),
    ]
    keys = {
        **_linear("time_embed.0", 1280, 320),
        **_linear("time_embed.2", 1280, 1280),
        **_conv("input_blocks.0.0", 320, 4, 3),
        **_vec("out.0", 320),
        **_conv("out.2", 4, 320, 3),
        **_res("middle_block.0", 1280, 1280),
        **_transformer("middle_block.1", 1280, context_dim, linear),
        **_res("middle_block.2", 1280, 1280),
    }
    width = 320
    for i, spec in enumerate(inputs_, start=1):
        if spec == "down":
            keys.update(_conv(f"input_blocks.{i}.0.op", width, width, 3))
            continue
        c_in, width, attn = spec
        keys.update(_res(f"input_blocks.{i}.0", c_in, width))
        if attn:
            keys.update(_transformer(f"input_blocks.{i}.1", width, context_dim, linear))
    for i, (c_in, c_out, attn, *up) in enumerate(outputs):
        keys.update(_res(f"output_blocks.{i}.0", c_in, c_out))
        if attn:
            keys.update(_transformer(f"output_blocks.{i}.1", c_out, context_dim, linear))
        if up:
            keys.update(_conv(f"output_blocks.{i}.{1 + attn}.conv", c_out, c_out, 3))
    return keys


def load_config(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg._target_ == "ldm.modules.unet.UNetModel"
    return cfg


def test_sd15_state_dict_layout():
    with torch.device("meta"):
        model = instantiate(load_config("sd15"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = sd_unet_layout()
    assert len(expected) == 686
    assert set(got) == set(expected)
    assert got == expected
    assert got["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert got["middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (320 * 4, 768)
    assert got["out.2.weight"] == (4, 320, 3, 3)
    assert got["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert got["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    heads = {m.heads for m in model.modules() if isinstance(m, CrossAttention)}
    assert heads == {8}


def test_sd21_linear_projections():
    with torch.device("meta"):
        model = instantiate(load_config("sd21"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == sd_unet_layout(context_dim=1024, linear=True)
    assert got["input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert got["output_blocks.11.1.proj_out.weight"] == (320, 320)
    assert got["middle_block.1.transformer_blocks.0.attn2.to_v.weight"] == (1280, 1024)
    head_shapes = {
        (m.to_q.out_features, m.heads, m.dim_head) for m in model.modules() if isinstance(m, CrossAttention)
    }
    assert head_shapes == {(320, 5, 64), (640, 10, 64), (1280, 20, 64)}
    assert sum(p.numel() for p in model.parameters()) == 865_910_724


def test_context_transform_hook_changes_k_and_v():
    model = UNetModel(**TINY).eval()
    perturb_zero_init(model)
    x, t, context = inputs()
    attn2 = model.middle_block[1].transformer_blocks[0].attn2
    seen = {}
    attn2.to_k.register_forward_hook(lambda m, args, out: seen.__setitem__("k", args[0]))
    attn2.to_v.register_forward_hook(lambda m, args, out: seen.__setitem__("v", args[0]))
    with torch.no_grad():
        plain = model(x, t, context)
        torch.testing.assert_close(seen["k"], context)
        torch.testing.assert_close(seen["v"], context)

        attn2.context_transform = lambda c: (c * 2.0, c - 1.0)
        hooked = model(x, t, context)
        torch.testing.assert_close(seen["k"], context * 2.0)
        torch.testing.assert_close(seen["v"], context - 1.0)
        assert (hooked - plain).abs().max() > 1e-4

        attn2.context_transform = None
        torch.testing.assert_close(model(x, t, context), plain)


def test_attention_projections_are_plain_linear():
    model = UNetModel(**TINY)
    for m in model.modules():
        if isinstance(m, CrossAttention):
            assert type(m.to_q) is torch.nn.Linear and m.to_q.bias is None
            assert type(m.to_k) is torch.nn.Linear and m.to_v.bias is None
            assert type(m.to_out[0]) is torch.nn.Linear and m.to_out[0].bias is not None
            assert m.context_transform is None


@pytest.mark.parametrize(
    "kwargs",
    [
        TINY,
        tiny_unet_config(
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(1, 2),
            num_heads=-1,
            num_head_channels=16,
            context_dim=48,
            use_linear_in_transformer=True,
        ),
        tiny_unet_config(
            channel_mult=(1, 2, 2),
            attention_resolutions=(1,),
            num_heads=2,
            context_dim=48,
            use_scale_shift_norm=True,
        ),
    ],
    ids=["tiny", "sd2-style", "attention-top-only"],
)
def test_parity_with_diffusers(kwargs):
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config_from_ldm(**kwargs)).eval()
    perturb_zero_init(theirs, seed=1)
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(theirs.state_dict(), theirs.config), strict=True)
    x, t, context = inputs(context_dim=kwargs["context_dim"], length=7)
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        got = ours(x, t, context)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_configs_run(name):
    model = instantiate(load_config(name))
    n_params = sum(p.numel() for p in model.parameters())
    if name == "small":
        assert 5e6 < n_params < 15e6
    x, t, context = inputs(context_dim=model.context_dim)
    with torch.no_grad():
        assert model(x, t, context).shape == x.shape


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_diffusers_key_mapping_full_size(name):
    """The diffusers -> LDM renaming covers every tensor of the real SD v1/v2 UNets."""
    import diffusers

    kwargs = OmegaConf.to_container(load_config(name))
    kwargs.pop("_target_")
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**diffusers_config_from_ldm(**kwargs))
        ours = UNetModel(**kwargs)
    mapped = diffusers_unet_to_ldm(theirs.state_dict(), theirs.config)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
