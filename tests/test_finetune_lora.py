"""LoRA fine-tuning end to end at test size: base discovery, adapter-only training and checkpoints,
kohya export that loads back, latent caching (memory and disk), before/after images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.finetune import FineTuneDataModule
from datamodules.image_folder import ImageFolderDataModule
from ldm.io.kohya_lora import load_kohya_lora, read_kohya_metadata
from ldm.models.checkpoint import load_lightning_model
from ldm.modules.vae import AutoencoderKL
from train import train

TINY_PARTS = ["model/vae=tiny", "model/unet=tiny", "model/sampler=ddim", "model.sampler.steps=2",
              "callbacks.rich_progress_bar=null"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny txt2img checkpoint trained for a few steps on a hand-made VAE checkpoint."""
    from tests.conftest import compose_train

    tmp = tmp_path_factory.mktemp("base")
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp / "vae.ckpt")
    cfg = compose_train(tmp, ["experiment=txt2img", *TINY_PARTS, "debug=smoke", "data.train_size=16",
                              "data.val_size=4", f"model.vae_ckpt={tmp / 'vae.ckpt'}",
                              "model.log_prompts=[a red circle on a blue background]"])
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def lora_overrides(base: Path, extra=()):
    return ["experiment=lora_finetune", *TINY_PARTS, "debug=smoke", f"model.base={base}",
            "data.source.train_size=16", "data.source.val_size=4", "data.batch_size=4",
            "model.log_prompts=[a red star on a blue background]", *extra]


def test_lora_finetune_trains_only_the_adapter_and_exports_kohya(compose_cfg, base_ckpt, tmp_path):
    cfg = compose_cfg(lora_overrides(base_ckpt, [f"data.cache_dir={tmp_path / 'cache'}"]))
    _, objects = train(cfg)
    model, trainer = objects["model"], objects["trainer"]
    run = Path(cfg.paths.output_dir)

    # the base came from the txt2img checkpoint (EMA UNet), frozen; only LoRA params are trainable
    base = load_lightning_model(base_ckpt)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(model.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
    assert float(model.scale_factor) == pytest.approx(float(base.scale_factor))

    # latents were cached (in memory and on disk) and used for training
    assert trainer.datamodule.cached is not None
    assert list((tmp_path / "cache").glob("latents_*.pt"))

    # checkpoints hold the adapter only
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k or k == "scale_factor" for k in ckpt["state_dict"])
    full_size = sum(v.numel() for v in base.state_dict().values())
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.2 * full_size

    # the exported kohya file loads back into a fresh copy of the base and reproduces the LoRA UNet
    exported = run / "adapters" / "lora_finetune.safetensors"
    assert exported.is_file()
    meta = read_kohya_metadata(exported)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_module"] == "networks.lora"
    fresh = load_lightning_model(base_ckpt).unet_ema.module
    summary = load_kohya_lora(exported, unet=fresh)
    assert summary["modules"] > 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx = torch.randn(2, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, ctx), model.unet(x, t, ctx), atol=1e-5, rtol=1e-4)

    # before/after grids
    images = run / "images"
    assert list(images.glob("samples_*.png")) and list(images.glob("base_samples_*.png"))


def test_lora_resume_from_adapter_only_checkpoint(compose_cfg, base_ckpt):
    first = compose_cfg(lora_overrides(base_ckpt, ["data.cache_dir=null", "trainer.max_steps=2",
                                                   "trainer.val_check_interval=2"]), output_name="a")
    train(first)
    resumed = compose_cfg(lora_overrides(base_ckpt, ["data.cache_dir=null", "trainer.max_steps=4",
                                                     "trainer.max_epochs=-1", "ckpt_path=last"]), output_name="b")
    _, objects = train(resumed)
    assert objects["trainer"].global_step == 4


def test_missing_base_is_a_clear_error(compose_cfg):
    cfg = compose_cfg(["experiment=lora_finetune", *TINY_PARTS, "debug=smoke", "data.cache_dir=null",
                       "data.source.train_size=8", "data.source.val_size=4"])
    with pytest.raises(FileNotFoundError, match="experiment=txt2img"):
        train(cfg)


def test_latent_cache_refuses_random_augmentation(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(tmp_path / f"{i}.png")
    source = ImageFolderDataModule(root=str(tmp_path), resolution=32, random_flip=0.5, val_size=1)
    dm = FineTuneDataModule(source, resolution=32, cache_latents=True)
    with pytest.raises(ValueError, match="random_flip"):
        dm.setup("fit")


def test_latent_cache_flip_variants(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 32))  # left half white
    img.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("half")
    source = ImageFolderDataModule(root=str(tmp_path), resolution=32, random_flip=0.0, val_size=0)
    dm = FineTuneDataModule(source, resolution=32, cache_latents=True, flip_variants=True)
    dm.setup("fit")
    dm.cache_latents(lambda x: (x.mean(1, keepdim=True), torch.ones_like(x[:, :1])), "identity")
    means = dm.cached.means  # [variant, N, 1, H, W]
    torch.testing.assert_close(means[1], means[0].flip(-1))
    assert dm.cached[0]["caption"] == "half"


def test_regularization_images_are_mixed_in():
    from datamodules.shapes import ShapesDataModule

    source = ShapesDataModule(resolution=32, train_size=12, val_size=4, train_split="concept")
    reg = ShapesDataModule(resolution=32, train_size=20, val_size=4, seed=1)
    dm = FineTuneDataModule(source, resolution=32, regularization=reg, regularization_size=6, cache_latents=True)
    dm.setup("fit")
    assert len(dm.data_train) == 18
    captions = [dm.data_train[i]["caption"] for i in range(18)]
    assert all("star" in c for c in captions[:12]) and not any("star" in c for c in captions[12:])


def test_lora_finetune_from_stable_diffusion_single_file(compose_cfg, base_ckpt, tmp_path):
    """model.base may be an SD single file (here our tiny model exported to the SD v1 layout)."""
    from ldm.io.stable_diffusion import export_from_lightning

    single = export_from_lightning(base_ckpt, tmp_path / "tiny-sd.safetensors", dtype=torch.float32)
    cfg = compose_cfg(lora_overrides(Path(single), ["data.cache_dir=null"]))
    _, objects = train(cfg)
    model = objects["model"]
    base = load_lightning_model(base_ckpt)
    torch.testing.assert_close(model.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
    assert (Path(cfg.paths.output_dir) / "adapters" / "lora_finetune.safetensors").is_file()
