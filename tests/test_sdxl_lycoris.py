"""LyCORIS algorithms (LoHa, LoKr, DoRA) on an SDXL base: ``ldm.io.sdxl_lora`` writes them with kohya's
SDXL module names (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*``), the LyCORIS tensor names and SDXL
metadata, and reads them back (injected or merged); the ``lycoris-lora`` package's own loader reads our files
to our outputs and merged weights, and files it writes read into ours -- as tests/test_lora_algorithms.py
does for SD 1.x. DoRA also in the PEFT layout (``text_encoder_2.*.lora_magnitude_vector``). The UNet and both
text encoders carry adapters in every test."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.io.lora_any import load_lora
from ldm.io.safe_load import read_safetensors_metadata
from ldm.io.sdxl_lora import save_sdxl_lora, sdxl_module_map
from ldm.models.finetune.fallback import tiny_random_base
from ldm.modules.adapters import TEXT_ENCODER_ALL, UNET_CONV, UNET_TRANSFORMER, inject_lora, lora_modules
from ldm.modules.adapters.algorithms import adapter_factory

ALGOS = ["loha", "lokr", "dora"]
PROMPTS = ["a red circle on a blue background", "a sks square"]


def tiny_xl_parts(seed: int = 0) -> dict:
    """``{"unet", "text_encoder", "text_encoder_2"}`` of a tiny SDXL base, every weight randomised."""
    base = tiny_random_base(32, "sdxl")
    parts = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in parts.values():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return {k: v.eval() for k, v in parts.items()}


def adapted(
    algo: str, rank=4, alpha=2.0, seed=0, unet_targets=UNET_TRANSFORMER + UNET_CONV
) -> tuple[dict, dict]:
    """(tiny SDXL parts with random ``algo`` adapters on the UNet's transformers and 3x3 convs and on both
    text encoders, a copy of the base parts)."""
    parts = tiny_xl_parts()
    base = copy.deepcopy(parts)
    factory = adapter_factory(algo, rank, alpha, conv_rank=2, conv_alpha=1.0, factor=4)
    inject_lora(parts["unet"], unet_targets, factory=factory)
    for name in ("text_encoder", "text_encoder_2"):
        inject_lora(parts[name].transformer, TEXT_ENCODER_ALL, factory=factory)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in parts.values():
            for layer in lora_modules(module).values():
                for p in layer.adapter_parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return parts, base


@torch.no_grad()
def outputs(parts: dict) -> dict[str, torch.Tensor]:
    """Each text encoder's context (and bigG's pooled vector) on two prompts, and the UNet's output."""
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        encoded = parts[name](PROMPTS)
        for key, value in encoded.items() if isinstance(encoded, dict) else [("context", encoded)]:
            out[f"{name}.{key}"] = value
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 80, generator=gen)
    y = torch.randn(2, 232, generator=gen)
    out["unet"] = parts["unet"](x, torch.tensor([10, 700]), context=context, y=y)
    return out


def assert_same(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=atol, msg=key)


def load_into(path, base: dict, **kwargs) -> tuple[dict, dict]:
    fresh = copy.deepcopy(base)
    summary = load_lora(
        path, unet=fresh["unet"], text_encoders=[fresh["text_encoder"], fresh["text_encoder_2"]], **kwargs
    )
    return fresh, summary


WANT = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
}


@pytest.mark.parametrize("algo", ALGOS)
def test_sdxl_lycoris_file_layout_metadata_and_round_trip(algo, tmp_path):
    parts, base = adapted(algo)
    expected = outputs(parts)
    path = save_sdxl_lora(tmp_path / f"{algo}.safetensors", parts, factor=4)
    tensors, meta = load_file(path), read_safetensors_metadata(path)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in tensors), prefix
    assert {k.partition(".")[2] for k in tensors} >= WANT[algo] - {"lokr_w2"}
    assert {k.partition(".")[2] for k in tensors} <= WANT[algo]
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ("lora" if algo == "dora" else algo) and args["conv_dim"] == "2"
    assert args.get("dora_wd") == ("True" if algo == "dora" else None)
    assert args.get("factor") == ("4" if algo == "lokr" else None)
    plain = outputs(base)
    for merge in (False, True):
        fresh, summary = load_into(path, base, merge=merge)
        assert summary["algo"] == [algo] and summary["text_encoder_2_modules"] > 0
        assert summary["modules"] == sum(len(lora_modules(m)) for m in parts.values())
        got = outputs(fresh)
        assert_same(got, expected)
        assert all((got[k] - plain[k]).abs().max() > 1e-3 for k in got)  # every part's adapter counts


def test_sdxl_dora_in_the_peft_layout_round_trips(tmp_path):
    parts, base = adapted("dora", unet_targets=UNET_TRANSFORMER)
    path = save_sdxl_lora(tmp_path / "dora_peft.safetensors", parts, layout="peft")
    keys = set(load_file(path))
    assert any(k.startswith("text_encoder_2.") and k.endswith(".lora_magnitude_vector") for k in keys)
    assert not any(k.startswith("lora_") for k in keys)
    fresh, summary = load_into(path, base, merge=True)
    assert summary["format"] == "peft" and summary["algo"] == ["dora"]
    assert_same(outputs(fresh), outputs(parts))


# ------------------------------------------------------------------------------------------ lycoris-lora


def lycoris_names(tensors: dict, base: dict) -> dict[str, dict]:
    """Our kohya SDXL tensors -> per part, the ``lycoris_<module>`` names LyCORIS's generic loader uses."""
    module_of = sdxl_module_map(base, "kohya")
    out: dict[str, dict] = {name: {} for name in base}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        component, module = module_of[name]
        out[component][f"lycoris_{module.replace('.', '_')}.{suffix}"] = value
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_reads_our_sdxl_files_to_our_outputs_and_merged_weights(algo, tmp_path):
    lycoris = pytest.importorskip("lycoris")
    parts, base = adapted(algo, rank=4, alpha=2.0)
    path = save_sdxl_lora(tmp_path / "ours.safetensors", parts)
    theirs = copy.deepcopy(base)
    for name, weights in lycoris_names(load_file(path), base).items():
        network, _ = lycoris.create_lycoris_from_weights(1.0, None, theirs[name], weights_sd=weights)
        assert len(network.loras) == len(lora_modules(parts[name])), name
        network.apply_to()  # their forward: how they train and sample
    assert_same(outputs(theirs), outputs(parts))
    # merged weights: LyCORIS 4.1's merge_to applies alpha/rank twice for LoHa/LoKr (its forward,
    # AUTOMATIC1111 and ComfyUI once), so they are compared where alpha = rank
    for layer in (layer for module in parts.values() for layer in lora_modules(module).values()):
        layer.alpha = float(layer.rank)
    path = save_sdxl_lora(tmp_path / "alpha_rank.safetensors", parts)
    theirs = copy.deepcopy(base)
    for name, weights in lycoris_names(load_file(path), base).items():
        lycoris.create_lycoris_from_weights(1.0, None, theirs[name], weights_sd=weights)[0].merge_to(1.0)
    ours, _ = load_into(path, base, merge=True)
    for name in base:
        mine, other = ours[name].state_dict(), theirs[name].state_dict()
        for key in mine:
            torch.testing.assert_close(mine[key], other[key], rtol=0, atol=1e-5, msg=f"{name}.{key}")


LYCORIS_ARGS = {
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr", "factor": 4},
    "dora": {"algo": "lora", "dora_wd": True},
}


@pytest.mark.parametrize("algo", ALGOS)
def test_sdxl_files_lycoris_writes_load_into_ours(algo, tmp_path):
    lycoris = pytest.importorskip("lycoris")
    base = tiny_xl_parts()
    theirs = copy.deepcopy(base)
    file_name = {(c, m.replace(".", "_")): n for n, (c, m) in sdxl_module_map(base, "kohya").items()}
    gen = torch.Generator().manual_seed(5)
    renamed, count = {}, 0
    for name, part in theirs.items():
        # the text encoders' layers kohya adapts (attention, MLP; not bigG's text_projection) are text_model's
        prefix = "" if name == "unet" else "transformer_text_model_"
        module = part if name == "unet" else part.transformer.text_model
        network = lycoris.create_lycoris(module, 1.0, linear_dim=4, linear_alpha=2.0, **LYCORIS_ARGS[algo])
        network.apply_to()
        count += len(network.loras)
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for key, value in network.state_dict().items():
            module_name, _, suffix = key.partition(".")
            if suffix != "scalar":
                ours = prefix + module_name.removeprefix("lycoris_")
                renamed[f"{file_name[(name, ours)]}.{suffix}"] = value.detach()
    path = tmp_path / "theirs.safetensors"
    save_file(
        renamed, path, {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "lycoris.kohya"}
    )
    ours, summary = load_into(path, base, merge=True)
    assert summary["algo"] == [algo] and summary["modules"] == count and summary["text_encoder_2_modules"]
    assert_same(outputs(ours), outputs(theirs))


def test_the_sd1_readers_name_where_an_sdxl_file_is_read(tmp_path):
    from ldm.io.kohya_lora import load_kohya_lora
    from ldm.io.lycoris_lora import load_lycoris_lora

    parts, _ = adapted("loha")
    path = save_sdxl_lora(tmp_path / "xl.safetensors", parts)
    sd = tiny_random_base(32, "sd")
    for reader in (load_kohya_lora, load_lycoris_lora):
        with pytest.raises(KeyError, match="lora_te1_/lora_te2_ keys are an SDXL LoRA.*load_sdxl_lora"):
            reader(path, unet=sd.unet, text_encoder=sd.text_encoder, merge=True)


def test_sdxl_locon_files_carry_kohyas_conv_dim_and_conv_alpha(tmp_path):
    parts, base = adapted("lora")  # LoRA on the transformers, rank 4 / alpha 2, and the 3x3 convs, 2 / 1
    path = save_sdxl_lora(tmp_path / "locon.safetensors", parts)
    meta = read_safetensors_metadata(path)
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "networks.lora",
        "4",
        "2.0",
    )
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    fresh, _ = load_into(path, base, merge=True)
    assert_same(outputs(fresh), outputs(parts))
