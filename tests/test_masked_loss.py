"""Masked loss (``data.masked_loss=true``, kohya's ``--masked_loss``): per-image masks (``cat.mask.png`` or
the alpha channel; the embedded DreamBooth subjects' own coverage) follow the image's bucket crop and flip,
are cached with its latent on the latent grid, and weight the diffusion loss per latent pixel; bad masks are
one clear error naming the file."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.finetune import FineTuneDataModule
from datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset, find_image_files
from datamodules.masks import MaskWeighted
from ldm.diffusion import DiffusionSchedule
from ldm.diffusion.losses import DiffusionLoss, weight_on_latent_grid
from tests.test_finetune_lora import FINETUNE_PARTS, base_ckpt  # noqa: F401 - base_ckpt is a fixture
from train import train


def masked_folder(root: Path) -> Path:
    """Images whose grey level is their mask (so any transform must keep them equal): cat.png with
    cat.mask.png, dog.png (black) with its mask in the alpha channel; 48x32 (a non-square bucket)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        mask = np.zeros((32, 48), np.uint8)
        mask[4:28, 6:30] = 255  # a subject left of centre: a flip moves it
        mask[10:20, 30:40] = rng.integers(1, 255, (10, 10), dtype=np.uint8)
        grey = np.repeat(mask[..., None], 3, axis=2)
        if name == "cat":
            Image.fromarray(grey).save(root / "cat.png")
            Image.fromarray(mask).save(root / "cat.mask.png")
        else:
            black = np.zeros_like(grey)  # composited on white: 1 - mask (linear, so resampling keeps it)
            Image.fromarray(np.concatenate([black, mask[..., None]], axis=2), "RGBA").save(root / "dog.png")
        (root / f"{name}.txt").write_text(f"a photo of a {name}")
    return root


def test_the_loss_weights_each_latent_element():
    schedule = DiffusionSchedule.from_config("linear", num_timesteps=10)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    output = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.tensor([3, 7])
    weight = torch.zeros(2, 1, 8, 8)
    weight[:, :, :4] = 1.0
    weight[:, :, 4:] = 0.25
    loss = DiffusionLoss("eps")(output, x0, noise, t, schedule, reduction="none", element_weight=weight)
    expected = ((output - noise) ** 2 * weight).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    weight[:, :, 4:] = 0.0
    DiffusionLoss("eps")(output, x0, noise, t, schedule, element_weight=weight).backward()
    assert output.grad[:, :, 4:].abs().max() == 0 and output.grad[:, :, :4].abs().max() > 0
    # an image-size weight meets the latent grid as the area average of each latent pixel's pixels
    image_weight = torch.zeros(2, 1, 32, 32)
    image_weight[:, :, :, :2] = 1.0  # a quarter of each latent pixel's columns in the first latent column
    grid = weight_on_latent_grid(image_weight, torch.zeros(2, 4, 8, 8))
    assert grid.shape == (2, 1, 8, 8) and torch.allclose(grid[:, :, :, 0], torch.full((2, 1, 8), 0.5))


def test_masks_follow_the_bucket_crop_and_flip(tmp_path):
    root = masked_folder(tmp_path / "images")
    assert [p.name for p in find_image_files(root)] == ["cat.png", "dog.png"]  # masks are not images
    data = ImageFolderDataset(
        root, resolution=32, center_crop=False, random_flip=0.5, bucketing=True, bucket_step=8, repeats=4
    )
    data.enable_masks()
    flipped_seen = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for index in range(len(data)):
            item = data[index]
            assert item["mask"].shape == (1, *item["image"].shape[-2:])
            # the image is its mask in grey (the black dog with its mask as alpha, on white: 1 - mask): the
            # same resize, crop and flip keep them so
            m, grey = item["mask"], (item["image"][:1] + 1) / 2
            expected = m if "cat" in item["caption"] else 1 - m
            torch.testing.assert_close(grey, expected, atol=3e-2, rtol=0)
            columns = item["mask"][0].sum(0)
            centroid = float((columns * torch.arange(len(columns))).sum() / columns.sum())
            flipped_seen.add(centroid > len(columns) / 2)  # the subject is left of centre unless flipped
    assert flipped_seen == {True, False}  # both orientations were drawn


@pytest.mark.parametrize("problem", ["wrong size", "empty", "missing"])
def test_a_bad_mask_is_one_error_naming_the_file(tmp_path, problem):
    root = masked_folder(tmp_path / "images")
    if problem == "wrong size":
        Image.new("L", (10, 10), 255).save(root / "cat.mask.png")
    elif problem == "empty":
        Image.new("L", (48, 32), 0).save(root / "cat.mask.png")
    else:
        (root / "cat.mask.png").unlink()
    data = ImageFolderDataset(root, resolution=32)
    expected = {"wrong size": "cat.mask.png is 10x10", "empty": "cat.mask.png is empty", "missing": "no mask"}
    with pytest.raises(ValueError, match=expected[problem]) as caught:
        data.enable_masks()
    assert "cat" in str(caught.value)


def test_weights_are_cached_with_the_latents_on_the_latent_grid_and_flipped(tmp_path):
    root = masked_folder(tmp_path / "images")
    source = ImageFolderDataModule(
        root=str(root), resolution=32, batch_size=2, val_size=0, bucket_step=8, random_flip=0.0
    )
    dm = FineTuneDataModule(
        source,
        batch_size=2,
        cache_latents=True,
        flip_variants=True,
        cache_dir=str(tmp_path / "cache"),
        masked_loss=True,
        unmasked_weight=0.1,
        validation="none",
    )
    dm.setup("fit")
    assert isinstance(dm.data_train, MaskWeighted)

    def encode(images):  # a stand-in VAE with factor 4: the latent is the image's 4x4 area average
        mean = torch.nn.functional.avg_pool2d(images, 4)
        return mean, torch.ones_like(mean)

    dm.cache_latents(encode, "fake-vae")
    cached = dm.cached
    for variant in (0, 1):
        for k in range(2):
            latent, weight = cached.means[variant][k], cached.weights[variant][k]
            assert weight.shape == (1, *latent.shape[-2:])
            # the weight is mask + 0.1 (1 - mask), the mask is the image's grey level: both on one grid
            grey = (latent[:1] + 1) / 2
            mask = grey if "cat" in cached.captions[k] else 1 - grey  # the dog: black, masked by its alpha
            torch.testing.assert_close(weight, 0.1 + 0.9 * mask, atol=2e-2, rtol=0)
    item = cached[0]
    assert "loss_weight" in item
    # a second datamodule finds the cache, weights included
    again = FineTuneDataModule(
        ImageFolderDataModule(
            root=str(root), resolution=32, batch_size=2, val_size=0, bucket_step=8, random_flip=0.0
        ),
        batch_size=2,
        cache_latents=True,
        flip_variants=True,
        cache_dir=str(tmp_path / "cache"),
        masked_loss=True,
        unmasked_weight=0.1,
        validation="none",
    )
    again.setup("fit")
    again.cache_latents(lambda images: pytest.fail("the cache was not used"), "fake-vae")
    assert again.cached.weights is not None
    # another unmasked_weight is another cache entry
    other = FineTuneDataModule(
        ImageFolderDataModule(
            root=str(root), resolution=32, batch_size=2, val_size=0, bucket_step=8, random_flip=0.0
        ),
        batch_size=2,
        cache_latents=True,
        flip_variants=True,
        cache_dir=str(tmp_path / "cache"),
        masked_loss=True,
        unmasked_weight=0.5,
        validation="none",
    )
    other.setup("fit")
    other.cache_latents(encode, "fake-vae")
    assert len(list((tmp_path / "cache").glob("latents_*.pt"))) == 2


class RecordBatches(L.Callback):
    def __init__(self):
        self.weights, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append((batch.get("loss_weight"), batch["is_regularization"].clone()))


def test_masked_dreambooth_trains_with_the_subjects_masks(compose_cfg, base_ckpt):  # noqa: F811
    """The embedded DreamBooth subject knows its mask; class images weigh 1 everywhere."""
    cfg = compose_cfg(
        [
            "experiment=dreambooth_lora",
            *FINETUNE_PARTS,
            "debug=smoke",
            f"model.base={base_ckpt}",
            "data.cache_dir=null",
            "data.concepts.0.num_instance_images=3",
            "data.concepts.0.num_class_images=3",
            "data.class_images.sampler=ddim",
            "data.class_images.steps=2",
            "data.class_images.cache_dir=null",
            "data.masked_loss=true",
            "data.unmasked_weight=0.2",
            "model.log_prompts=[a sks square on a red background]",
            "+callbacks.record._target_=tests.test_masked_loss.RecordBatches",
        ]
    )
    _, objects = train(cfg)
    recorder = next(c for c in objects["trainer"].callbacks if isinstance(c, RecordBatches))
    assert recorder.weights
    for weight, is_class in recorder.weights:
        assert weight is not None and weight.shape[1:] == (1, 8, 8)  # the 32 px images' latent grid (f = 4)
        for w, flag in zip(weight, is_class):
            if flag:
                assert torch.equal(w, torch.ones_like(w))
            else:  # the subject counts fully, the background 0.2, its edges in between
                assert w.max() == 1.0 and torch.isclose(w.min(), torch.tensor(0.2)) and w.mean() < 0.9
    # the model weighs the loss with them
    model = objects["model"]
    batch = {"loss_weight": recorder.weights[0][0]}
    grid = model.loss_element_weight(batch, torch.zeros(recorder.weights[0][0].shape[0], 4, 8, 8))
    assert torch.equal(grid, recorder.weights[0][0])
