"""LoRA layers and injection (ldm/modules/adapters/lora.py): zero-init identity, target presets, gradients,
merge / unmerge / multiplier, removal, and the state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
from tests.lora_parts import (
    PROMPTS,
    TINY,
    TINY_SD2,
    close,
    make_unet,
    randomize_lora,
    te_out,
    unet_inputs,
    unet_out,
)

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
