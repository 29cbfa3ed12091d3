"""DreamBooth: the full-UNet method (parameters, checkpoint state, SD single-file export), the combined
instance + prior-preservation loss, and the experiments end to end at test size."""

from __future__ import annotations

import pytest
import torch

from ldm.io.base_model import load_base_model
from ldm.models.finetune.full import FullUNet
from ldm.models.finetune.method import MethodDisabledUnsupported
from tests.test_latent_diffusion import tiny_model


def attached(**kwargs) -> tuple[FullUNet, torch.nn.Module]:
    torch.manual_seed(0)
    model = tiny_model(scale_factor=0.5, ema_decay=None)
    model.image_resolution = 32
    for part in (model.unet, model.vae, model.text_encoder):
        part.requires_grad_(False)
    method = FullUNet(**kwargs)
    method.attach(model)
    return method, model


def test_full_unet_trains_the_whole_unet_and_optionally_the_text_encoder():
    method, model = attached()
    assert {id(p) for p in method.parameters()} == {id(p) for p in model.unet.parameters()}
    assert all(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert set(method.state_dict()) == {f"unet.{k}" for k in model.unet.state_dict()}
    with pytest.raises(MethodDisabledUnsupported):
        method.disabled()

    method, model = attached(train_text_encoder=True, text_encoder_lr=1e-5)
    groups = method.param_groups()
    assert [g["name"] for g in groups] == ["unet", "text_encoder"] and groups[1]["lr"] == 1e-5 and "lr" not in groups[0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.text_encoder.transformer.parameters()}
    assert method.trains_text_encoder and not model.text_encoder.cache_enabled
    optimizer = torch.optim.AdamW(groups, lr=1e-4)  # what the core builds from param_groups()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-5]
    assert any(k.startswith("text_encoder.") for k in method.state_dict())
    with pytest.raises(ValueError, match="train_text_encoder"):
        FullUNet(text_encoder_lr=1e-5)


def test_full_unet_state_round_trip_is_strict():
    method, _ = attached(train_text_encoder=True)
    state = {k: v.clone() + 0.01 for k, v in method.state_dict().items()}
    other, _ = attached(train_text_encoder=True)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({k: v for k, v in state.items() if k.startswith("unet.")})
    unet_only, _ = attached()
    with pytest.raises(ValueError, match="unexpected"):
        unet_only.load_state_dict(state)


def test_combined_loss_weights_class_items():
    per_item = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    batch = {"is_regularization": torch.tensor([False, False, True, True, True])}
    assert float(FullUNet(prior_loss_weight=1.0).loss(per_item, batch)) == pytest.approx(1.5 + 13 / 3)
    assert float(FullUNet(prior_loss_weight=0.5).loss(per_item, batch)) == pytest.approx(1.5 + 0.5 * 13 / 3)
    assert float(FullUNet(prior_loss_weight=0.0).loss(per_item, batch)) == pytest.approx(1.5)  # prior off
    assert float(FullUNet().loss(per_item, batch)) == pytest.approx(16 / 5)  # no weight: one plain mean
    only_instances = {"is_regularization": [False] * 5}
    assert float(FullUNet(prior_loss_weight=1.0).loss(per_item, only_instances)) == pytest.approx(16 / 5)
    grad = torch.ones(5, requires_grad=True)
    FullUNet(prior_loss_weight=2.0).loss(grad * per_item, batch).backward()
    torch.testing.assert_close(grad.grad, torch.tensor([0.5, 1.0, 2 / 3 * 3, 2 / 3 * 4, 2 / 3 * 6]))


def test_export_is_an_sd_single_file_that_loads_back(tmp_path):
    method, model = attached()
    with torch.no_grad():
        model.unet.out[-1].bias.add_(0.25)  # a "fine-tuned" UNet
    path = method.export(tmp_path / "dreambooth.safetensors", {"ss_steps": 3})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert meta["ldm.method"] == "dreambooth-full-unet" and meta["ss_steps"] == "3"

    loaded = load_base_model(path)
    assert loaded.scale_factor == pytest.approx(0.5) and loaded.resolution == 32
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value.half().float())
    x, t, prompts = torch.randn(1, 4, 8, 8), torch.tensor([300]), ["a sks square on a red background"]
    with torch.no_grad():
        expected = model.unet(x, t, model.text_encoder(prompts))
        got = loaded.unet(x, t, loaded.text_encoder(prompts))
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # fp16 file
