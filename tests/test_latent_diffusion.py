"""LatentDiffusion: pretrained-VAE discovery, scale_factor, CFG dropout, EMA, sampling, reload + sample.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sample
from ldm.diffusion import DDIMSampler, DiffusionSchedule
from ldm.models.checkpoint import load_lightning_model
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.pretrained import find_checkpoint, load_prefixed_state
from ldm.modules.ema import EMA
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet
from ldm.modules.vae import AutoencoderKL
from train import train

TINY_LDM = [
    "experiment=txt2img",
    "model/vae=tiny",
    "model/unet=tiny",
    "model/text_encoder=tiny",
    "data.train_size=32",
    "data.val_size=8",
    "data.batch_size=4",
    "model/sampler=ddim",
    "model.sampler.steps=2",
    "model.log_prompts=[a red circle on a blue background]",
    "callbacks.rich_progress_bar=null",
]


def tiny_vae():
    return AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)


def tiny_model(**kw):
    text = CLIPTextEncoder.tiny()
    unet = tiny_unet(context_dim=text.hidden_size, use_linear_in_transformer=True)
    return LatentDiffusion(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=text,
        schedule=DiffusionSchedule.from_config(),
        sampler=DDIMSampler(steps=3),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        **kw,
    )


def test_context_dim_mismatch_is_a_clear_error():
    text = CLIPTextEncoder.tiny()
    unet = tiny_unet(channel_mult=[1], attention_resolutions=[1], context_dim=text.hidden_size + 1)
    with pytest.raises(ValueError, match="context_dim"):
        LatentDiffusion(
            unet=unet,
            vae=tiny_vae(),
            text_encoder=text,
            schedule=DiffusionSchedule.from_config(),
            sampler=DDIMSampler(steps=2),
            optimizer=torch.optim.SGD,
        )


def test_only_unet_is_trainable_and_vae_stays_in_eval():
    model = tiny_model()
    model.train()
    assert not model.vae.training
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.unet.parameters()}
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def dropped_fraction(model, n: int = 4000) -> float:
    torch.manual_seed(0)
    context = model.conditions({"caption": ["a"] * n}, train=True)["crossattn"]
    empty = model.encode_text([""])[0]
    return sum(torch.equal(row, empty) for row in context) / n


def test_condition_dropout_rate():
    assert 0.27 < dropped_fraction(tiny_model(ucg_rate=0.3)) < 0.33
    assert dropped_fraction(tiny_model(ucg_rate=0.0), 8) == 0


def test_ema_moves_toward_source_with_warmup():
    src = torch.nn.Linear(2, 2)
    ema = EMA(src, decay=0.9)
    with torch.no_grad():
        src.weight.add_(1.0)
    ema.update(src)  # first decay: min(0.9, 1/10) = 0.1
    expected = 0.1 * (src.weight - 1.0) + 0.9 * src.weight
    torch.testing.assert_close(ema.module.weight, expected)
    assert not ema.module.weight.requires_grad


def test_generate_is_seeded_and_uses_prompts():
    model = tiny_model(scale_factor=1.0)
    with torch.no_grad():  # perturb the zero-initialised output layers so the UNet is not trivially 0
        for p in model.unet_ema.module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a = model.generate(["a red circle on a blue background"], seed=3, latent_size=8)
    b = model.generate(["a red circle on a blue background"], seed=3, latent_size=8)
    c = model.generate(["a green square on a white background"], seed=3, latent_size=8)
    assert a.shape == (1, 3, 32, 32)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiment=vae"):
        find_checkpoint(None, tmp_path, "vae", "VAE")


def test_mismatched_vae_checkpoint_names_keys(tmp_path):
    other = AutoencoderKL(
        embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4
    )
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {f"vae.{k}": v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        load_prefixed_state(tiny_vae(), path, "vae", "VAE")


def test_vae_then_txt2img_then_sample(compose_cfg, tmp_path):
    """The embedded chain at test size: the VAE run is found automatically, the scale factor estimated,
    the checkpoint reloads by itself and sample.py writes a grid."""
    vae_cfg = compose_cfg(
        [
            "experiment=vae",
            "model/vae=tiny",
            "debug=smoke",
            "data.train_size=16",
            "data.val_size=4",
            "callbacks.rich_progress_bar=null",
        ]
    )
    train(vae_cfg)
    cfg = compose_cfg([*TINY_LDM, "debug=smoke"])
    _, objects = train(cfg)
    model = objects["model"]
    assert float(model.scale_factor) > 0
    vae_ckpt = torch.load(
        next(Path(vae_cfg.paths.output_dir).glob("checkpoints/last.ckpt")), weights_only=True
    )
    torch.testing.assert_close(
        model.vae.encoder.conv_in.weight, vae_ckpt["state_dict"]["vae.encoder.conv_in.weight"]
    )
    images = list((Path(cfg.paths.output_dir) / "images").glob("samples_*.png"))
    assert images, "log_images wrote no sample grid"

    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    reloaded = load_lightning_model(ckpt)
    torch.testing.assert_close(reloaded.scale_factor, model.scale_factor)
    grid = sample.main(
        [
            "--ckpt",
            str(ckpt),
            "--prompt",
            "a red circle on a blue background",
            "--n",
            "2",
            "--steps",
            "2",
            "--sampler",
            "ddim",
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    assert grid.is_file() and len(list((tmp_path / "out").glob("0*.png"))) == 2
