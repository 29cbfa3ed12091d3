"""LoRA tools by SVD (ldm/modules/adapters/lora_svd.py, ldm/io/lora_tools.py, scripts/lora_tools.py):
resizing a kohya file to a lower rank keeps the best approximation of each delta (Eckart-Young) and says how
much it keeps; extracting from a full fine-tune vs its base gives back a low-rank difference exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from ldm.io.kohya_lora import save_kohya_lora
from ldm.io.lora_any import load_lora
from ldm.io.lora_tools import resize_lora_file
from ldm.io.safe_load import read_safetensors_metadata
from ldm.modules.adapters import UNET_CONV, UNET_TRANSFORMER, inject_lora, lora_modules
from ldm.modules.adapters.lora_svd import choose_rank, low_rank_factors
from tests.lora_parts import make_unet, unet_out
from tests.test_sample_cli import single_file  # noqa: F401 - a fixture


def lora_tools_main():
    from tests.conftest import load_script

    return load_script("scripts/lora_tools.py").main


def test_svd_factors_are_the_best_low_rank_approximation():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(12, 3, generator=gen) @ torch.randn(3, 20, generator=gen)  # rank 3
    low = low_rank_factors(exact, rank=8)
    assert low.rank == 3 and low.kept == pytest.approx(1.0)  # never past the numerical rank
    torch.testing.assert_close(low.up @ low.down, exact, rtol=1e-4, atol=1e-4)
    values = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14
    assert choose_rank(values, energy=0.6) == 1 and choose_rank(values, energy=0.9) == 2
    assert choose_rank(values, energy=0.99) == 3 and choose_rank(values, rank=2, energy=0.99) == 2
    conv = torch.randn(6, 4, 3, 3, generator=gen)
    low = low_rank_factors(conv, rank=2)
    assert low.down.shape == (2, 4, 3, 3) and low.up.shape == (6, 2, 1, 1)
    s = torch.linalg.svdvals(conv.flatten(1))
    assert low.kept == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-5)


def test_resize_keeps_the_delta_at_full_rank_and_its_best_part_below(tmp_path):
    unet = make_unet()
    base = copy.deepcopy(unet)
    inject_lora(unet, UNET_TRANSFORMER + UNET_CONV, rank=8, alpha=4.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(unet).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=gen) * 0.1)
    source = save_kohya_lora(tmp_path / "r8.safetensors", unet, metadata={"ss_steps": 7})
    same = resize_lora_file(source, tmp_path / "same.safetensors", rank=8)
    assert same["total_kept"] == pytest.approx(1.0, abs=1e-6)
    fresh = copy.deepcopy(base)
    load_lora(tmp_path / "same.safetensors", unet=fresh, merge=True)
    torch.testing.assert_close(unet_out(fresh), unet_out(unet), rtol=1e-4, atol=1e-5)

    report = resize_lora_file(source, tmp_path / "r2.safetensors", rank=2)
    tensors, meta = (
        load_file(tmp_path / "r2.safetensors"),
        read_safetensors_metadata(tmp_path / "r2.safetensors"),
    )
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {2}
    assert (
        meta["ss_network_dim"] == "2"
        and meta["ss_steps"] == "7"
        and "resized by SVD" in meta["ss_training_comment"]
    )
    assert 0 < report["total_kept"] < 1 and report["kept_at_rank"][2] == pytest.approx(report["total_kept"])
    assert report["kept_at_rank"][8] == pytest.approx(1.0, abs=1e-6)
    # each module's rank-2 delta is the truncated SVD of its rank-8 delta
    name = next(k.partition(".")[0] for k in tensors if "attn1_to_q" in k)
    big = load_file(source)
    delta = 0.5 * big[f"{name}.lora_up.weight"] @ big[f"{name}.lora_down.weight"]
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(
        tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"], best, rtol=1e-4, atol=1e-5
    )
    energy = resize_lora_file(source, tmp_path / "e.safetensors", energy=0.5)
    assert all(k >= 0.5 for k in energy["kept"].values())


def test_resize_refuses_lycoris_files(tmp_path):
    from ldm.io.lycoris_lora import save_lycoris_lora
    from ldm.modules.adapters.algorithms import adapter_factory

    unet = make_unet()
    inject_lora(unet, UNET_TRANSFORMER, factory=adapter_factory("loha", 2))
    path = save_lycoris_lora(tmp_path / "loha.safetensors", unet)
    with pytest.raises(ValueError, match="resize reads plain kohya LoRA / LoCon files"):
        resize_lora_file(path, tmp_path / "out.safetensors", rank=1)


def test_extract_gives_back_a_low_rank_fine_tune(single_file, tmp_path, capsys):  # noqa: F811
    from ldm.io.single_file_export import export_components
    from ldm.models.base_loader import load_base_model

    tuned = load_base_model(single_file)
    gen = torch.Generator().manual_seed(2)
    changed = []
    with torch.no_grad():
        for name, module in tuned.unet.named_modules():
            if name.endswith(("attn2.to_v", "ff.net.2")):
                out_dim, in_dim = module.weight.shape
                module.weight.add_(
                    torch.randn(out_dim, 3, generator=gen) @ torch.randn(3, in_dim, generator=gen) * 0.05
                )
                changed.append(name)
    tuned_file = export_components(tuned, tmp_path / "tuned.safetensors", dtype="float32")
    out = tmp_path / "extracted.safetensors"
    report = lora_tools_main()(
        ["extract", "--base", str(single_file), "--tuned", str(tuned_file), "--rank", "4", "--out", str(out)]
    )
    assert report["modules"] == len(changed) and set(report["ranks"].values()) == {3}  # the delta's own rank
    assert report["total_kept"] == pytest.approx(1.0, abs=1e-5)
    assert "kept 100.00% of the difference" in capsys.readouterr().out
    base = load_base_model(single_file)
    load_lora(out, unet=base.unet, merge=True)
    for (key, mine), (_, theirs) in zip(
        base.unet.state_dict().items(), tuned.unet.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=key)


def test_extract_of_an_unchanged_model_says_so(single_file, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="nothing to extract"):
        lora_tools_main()(
            [
                "extract",
                "--base",
                str(single_file),
                "--tuned",
                str(single_file),
                "--rank",
                "4",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["resize", "--lora", "missing.safetensors", "--rank", "2", "--out", "o"], "no such file"),
        (["resize", "--lora", "x", "--out", "o"], "give --rank and/or --energy"),
        (["resize", "--lora", "x", "--energy", "1.5", "--out", "o"], "--energy must be in"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        lora_tools_main()(argv)
    assert message in capsys.readouterr().err
