"""Our Lightning checkpoints as a base source: EMA or raw UNet, refused overrides, export to a single file
and scripts/convert.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.io.single_file_export import export_components
from ldm.models.base_loader import load_base_model
from tests.interop_parts import PROMPT, TINY_TEXT, TINY_UNET, TINY_VAE, assert_weights_equal, perturb

# --------------------------------------------------------------------------------------------------------
# Our Lightning checkpoints, and sample.py on every kind of source
# --------------------------------------------------------------------------------------------------------


def lightning_checkpoint(path: Path) -> tuple[Path, object]:
    import hydra
    from omegaconf import OmegaConf

    config = {
        "_target_": "ldm.models.latent_diffusion.LatentDiffusion",
        "unet": {"_target_": "ldm.modules.unet.UNetModel", **TINY_UNET},
        "vae": {"_target_": "ldm.modules.vae.AutoencoderKL", **TINY_VAE},
        "text_encoder": {"_target_": "ldm.modules.text_encoder.CLIPTextEncoder.tiny", **TINY_TEXT},
        "schedule": {"_target_": "ldm.diffusion.DiffusionSchedule.from_config", "kind": "scaled_linear"},
        "sampler": {"_target_": "ldm.diffusion.DDIMSampler", "steps": 2},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
        "scale_factor": 0.5,
        "ema_decay": 0.9,
    }
    model = hydra.utils.instantiate(OmegaConf.create(config), _convert_="all")
    perturb(model.unet, 7)
    perturb(model.unet_ema.module, 8)
    perturb(model.vae, 9)
    torch.save({"state_dict": model.state_dict(), "model_config": config, "global_step": 1}, path)
    return path, model


def test_lightning_checkpoint_source_and_export(tmp_path):
    path, model = lightning_checkpoint(tmp_path / "last.ckpt")
    ema = load_base_model(path, use_ema=True)
    assert_weights_equal(ema.unet, model.unet_ema.module)
    raw = load_base_model(path, use_ema=False)
    assert_weights_equal(raw.unet, model.unet)
    assert (raw.scale_factor, raw.parameterization, raw.resolution) == (0.5, "eps", 16)
    with pytest.raises(TypeError, match="cannot be overridden"):
        load_base_model(path, unet=TINY_UNET)

    out = export_components(
        load_base_model(path, use_ema=True), tmp_path / "exported.safetensors", dtype=torch.float32
    )
    back = load_base_model(out)
    assert_weights_equal(back.unet, model.unet_ema.module)
    assert_weights_equal(back.vae, model.vae)
    torch.testing.assert_close(back.text_encoder([PROMPT]), model.text_encoder([PROMPT]))

    # the CLI: any source -> single file (raw UNet, fp32)
    from tests.conftest import load_script

    convert = load_script("scripts/convert.py")
    converted = convert.main(
        ["--base", str(path), "--out", str(tmp_path / "cli.safetensors"), "--no-ema", "--fp32"]
    )
    assert_weights_equal(load_base_model(converted).unet, model.unet)
