"""Aspect-ratio buckets: bucket sizes, nearest-bucket assignment with the smallest crop, the bucket batch
sampler (single-bucket batches, shuffling, disjoint DDP ranks, mid-epoch resume) and the image folder
with buckets, through Lightning's own DDP sampler injection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from datamodules.bucket_sampler import BucketBatchSampler
from datamodules.buckets import assign_buckets, cover_size, make_buckets, nearest_bucket
from datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset

# (width, height) of the test images: portrait, landscape, square, panorama, tall
MIXED_SIZES = [(64, 96), (96, 64), (80, 80), (128, 48), (48, 112), (72, 108), (100, 60), (64, 64)]


def gradient_image(width: int, height: int) -> Image.Image:
    """Red encodes the column (0 at the left edge .. 255 at the right), green the row."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def make_mixed_folder(root, sizes=MIXED_SIZES):
    root.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        gradient_image(w, h).save(root / f"img{k}.png")
        (root / f"img{k}.txt").write_text(f"image {k}")
    return root


def test_make_buckets_sides_area_and_limits():
    for resolution, step in [(512, 64), (64, 16), (256, 32)]:
        buckets = make_buckets(resolution, step)
        assert (resolution // step * step,) * 2 in buckets
        for w, h in buckets:
            assert w % step == 0 and h % step == 0
            assert w * h <= resolution**2
            assert resolution // 2 <= min(w, h) and max(w, h) <= 2 * resolution
            assert (h, w) in buckets  # portrait and landscape alike
    # kohya's SD 1.x buckets at 512 include these
    assert {(512, 512), (448, 576), (384, 640), (320, 768), (256, 1024)} <= set(make_buckets(512, 64))
    limited = make_buckets(512, 64, min_side=384, max_side=640)
    assert min(min(b) for b in limited) >= 384 and max(max(b) for b in limited) <= 640
    with pytest.raises(ValueError, match="min_side"):
        make_buckets(512, 64, min_side=576)


def test_nearest_bucket_and_cover_crop_is_smallest():
    buckets = make_buckets(512, 64)
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (512, 512)
    portrait = buckets[nearest_bucket(600, 900, buckets)]
    assert (
        abs(math.log(portrait[0] / portrait[1]) - math.log(2 / 3))
        <= min(abs(math.log(w / h) - math.log(2 / 3)) for w, h in buckets) + 1e-12
    )
    assert portrait[0] < portrait[1]
    assert (
        assign_buckets([(600, 900), (1200, 1800), (900, 600)], buckets)[:2]
        == [nearest_bucket(600, 900, buckets)] * 2
    )
    w, h = cover_size(600, 900, portrait)
    assert w >= portrait[0] and h >= portrait[1] and (w == portrait[0] or h == portrait[1])


@pytest.mark.parametrize("size", MIXED_SIZES)
def test_bucketed_item_loses_only_the_crop_its_bucket_requires(tmp_path, size):
    """The red/green ranges that survive show how much of each axis was kept."""
    make_mixed_folder(tmp_path, [size])
    dataset = ImageFolderDataset(tmp_path, resolution=64, bucketing=True, bucket_step=16)
    bucket = dataset.target_size(0)
    image = dataset[0]["image"]
    assert tuple(image.shape) == (3, bucket[1], bucket[0])
    rgb = (image + 1) * 127.5
    kept_x = float(rgb[0].max() - rgb[0].min()) / 255
    kept_y = float(rgb[1].max() - rgb[1].min()) / 255
    w, h = size
    required = min(1.0, (bucket[0] / bucket[1]) / (w / h)) * min(1.0, (bucket[1] / bucket[0]) / (h / w))
    assert kept_x * kept_y >= required - 0.05, (size, bucket, kept_x, kept_y, required)
    # and better than the square centre crop whenever the image is not square
    square = ImageFolderDataset(tmp_path, resolution=64)[0]["image"]
    sq = (square + 1) * 127.5
    kept_square = float(sq[0].max() - sq[0].min()) * float(sq[1].max() - sq[1].min()) / 255**2
    if w != h:
        assert kept_x * kept_y > kept_square + 0.05


def test_sampler_batches_single_bucket_cover_each_item_and_shuffle():
    bucket_ids = [0] * 10 + [1] * 7 + [2] * 3
    sampler = BucketBatchSampler(bucket_ids, batch_size=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    for batch in batches:
        assert len({bucket_ids[i] for i in batch}) == 1
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert sampler.current_epoch == 0 and sampler.epoch == 1
    assert list(sampler) != batches  # each iteration is the next epoch: a new order
    sampler.set_epoch(0)
    assert list(sampler) == batches  # ... that is reproducible
    ordered = list(BucketBatchSampler(bucket_ids, batch_size=4, shuffle=False))
    assert ordered[0] == [0, 1, 2, 3] and ordered[-1] == [17, 18, 19]
    assert all(len(b) == 4 for b in BucketBatchSampler(bucket_ids, batch_size=4, drop_last=True))


def test_sampler_ranks_are_disjoint_with_equal_step_counts():
    bucket_ids = [0] * 9 + [1] * 5 + [2] * 2
    per_rank = [list(BucketBatchSampler(bucket_ids, 2, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1])  # DDP needs the same number of steps on every rank
    seen = [{i for b in batches for i in b} for batches in per_rank]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= 16 - 2  # at most one batch per epoch left out


def test_sampler_resumes_at_the_next_batch():
    bucket_ids = [k % 3 for k in range(30)]
    full = BucketBatchSampler(bucket_ids, 4, seed=5)
    full.set_epoch(2)
    expected = list(full)
    resumed = BucketBatchSampler(bucket_ids, 4, seed=5, position=full.position_state(2, 3))
    assert resumed.epoch == 2
    assert list(resumed) == expected[3:]
    assert list(resumed) == list(full)  # then the next epoch, from its start
    finished = BucketBatchSampler(bucket_ids, 4, seed=5, position=full.position_state(2, len(full)))
    assert finished.epoch == 3  # a complete epoch resumes at the next one


def test_image_folder_datamodule_bucket_batches(tmp_path, caplog):
    make_mixed_folder(tmp_path / "data")
    dm = ImageFolderDataModule(
        tmp_path / "data", resolution=64, batch_size=2, val_size=2, bucket_step=16, num_workers=0
    )
    with caplog.at_level("INFO", logger="datamodules.image_folder"):
        dm.setup()
    assert "buckets used by 6 images" in caplog.text and "64x64" in caplog.text
    shapes = set()
    for batch in dm.train_dataloader():
        assert len({tuple(img.shape) for img in batch["image"]}) == 1
        shapes.add(tuple(batch["image"].shape[-2:]))
    assert len(shapes) >= 3 and any(h != w for h, w in shapes)
    for batch in dm.val_dataloader():
        assert batch["image"].ndim == 4


def test_lightning_ddp_injection_keeps_buckets_and_splits_ranks(tmp_path):
    """What Lightning does under DDP: re-create our batch sampler with a DistributedSampler."""
    make_mixed_folder(tmp_path / "data", MIXED_SIZES * 3)
    dm = ImageFolderDataModule(tmp_path / "data", resolution=64, batch_size=2, val_size=0, bucket_step=16)
    dm.setup()
    seen = []
    for rank in (0, 1):
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = dm.train_dataloader()
        loader = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=rank))
        sampler = loader.batch_sampler
        assert isinstance(sampler, BucketBatchSampler) and (sampler.num_replicas, sampler.rank) == (2, rank)
        _set_sampler_epoch(loader, 1)  # Lightning's epoch numbers do not move our order
        assert sampler.epoch == 0
        seen.append({i for b in sampler for i in b})
        for batch in loader:
            assert len({tuple(img.shape) for img in batch["image"]}) == 1
    assert not seen[0] & seen[1] and seen[0] and seen[1]


def test_square_when_bucketing_is_off(tmp_path):
    make_mixed_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, resolution=32)
    assert {tuple(dataset[k]["image"].shape) for k in range(len(dataset))} == {(3, 32, 32)}
    assert set(dataset.bucket_ids) == {0}
    assert torch.is_tensor(dataset[0]["image"])


def test_sampler_validation_split_covers_every_item_on_every_rank_count():
    bucket_ids = [0, 0, 0, 1]  # two batches of 3 and 1
    per_rank = [
        list(BucketBatchSampler(bucket_ids, 3, shuffle=False, num_replicas=3, rank=r)) for r in range(3)
    ]
    assert [len(b) for b in per_rank] == [1, 1, 1]  # no rank without a batch
    assert {i for batches in per_rank for b in batches for i in b} == {0, 1, 2, 3}
    few = [BucketBatchSampler([0, 0], 2, shuffle=True, num_replicas=2, rank=r) for r in range(2)]
    assert [len(s) for s in few] == [1, 1] and [len(list(s)) for s in few] == [1, 1]
