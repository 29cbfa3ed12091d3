"""SDXL micro-conditioning from the data really used: each training item's original size, crop offset and
target size, under sgm's batch keys, for center / random crops, flips (the crop mirrored, kohya's rule),
buckets and the shapes data (rendered at the target size, or larger and randomly cropped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.image_folder import ImageFolderDataset
from datamodules.shapes import ShapesDataset, render
from datamodules.transforms import preprocess, preprocess_to_size, size_conditions

KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def pairs(sizes: dict) -> tuple:
    return tuple(tuple(sizes[k].tolist()) for k in KEYS)


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    return Image.fromarray(x)


def test_size_conditions_mirror_the_crop_of_a_flipped_image():
    # a 32 x 32 crop at left 4 of a 52 x 32 resized image: flipped, the same pixels sit 52 - 36 = 16
    # from the left
    assert pairs(size_conditions((104, 64), (52, 32), (4, 0, 36, 32), flipped=False)) == (
        (64, 104),
        (0, 4),
        (32, 32),
    )
    assert pairs(size_conditions((104, 64), (52, 32), (4, 0, 36, 32), flipped=True)) == (
        (64, 104),
        (0, 16),
        (32, 32),
    )


def test_preprocess_reports_the_center_crop_and_flip_it_took():
    image = gradient(100, 60)  # resized to 53 x 32, centre crop at left (53 - 32) // 2 = 10
    tensor, sizes = preprocess(image, 32, with_sizes=True)
    assert torch.equal(tensor, preprocess(image, 32)) and pairs(sizes) == ((60, 100), (0, 10), (32, 32))
    flipped, sizes = preprocess(image, 32, flip_probability=1.0, with_sizes=True)
    assert torch.equal(flipped, tensor.flip(-1)) and pairs(sizes) == ((60, 100), (0, 53 - 42), (32, 32))
    # the original size can be given (an image decoded at a reduced scale reports its file's size)
    assert pairs(preprocess(image, 32, original_size=(200, 120), with_sizes=True)[1])[0] == (120, 200)


def test_random_crops_report_their_offsets_with_the_same_draws():
    image = gradient(60, 100)
    offsets = set()
    for seed in range(6):
        plain = preprocess_to_size(
            image, (32, 48), center_crop=False, generator=torch.Generator().manual_seed(seed)
        )
        tensor, sizes = preprocess_to_size(
            image, (32, 48), center_crop=False, with_sizes=True, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(plain, tensor)  # reporting the sizes draws nothing more
        original, (top, left), target = pairs(sizes)
        assert original == (100, 60) and target == (48, 32) and left == 0  # resized to 32 x 53: crops along y
        resized = np.asarray(image.resize((32, 53), Image.Resampling.LANCZOS, reducing_gap=3.0))
        expected = torch.from_numpy(resized[top : top + 48].copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(tensor, expected)
        offsets.add(top)
    assert len(offsets) > 1


def test_image_folder_items_carry_sizes_only_when_asked(tmp_path):
    gradient(80, 48).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide one")
    item = ImageFolderDataset(tmp_path, resolution=32)[0]
    assert set(item) == {"image", "caption"}  # SD 1.x batches unchanged
    item = ImageFolderDataset(tmp_path, resolution=32, size_conditions=True)[0]
    assert pairs(item) == ((48, 80), (0, (53 - 32) // 2), (32, 32))
    bucketed = ImageFolderDataset(
        tmp_path, resolution=32, size_conditions=True, bucketing=True, bucket_step=8
    )[0]
    assert pairs(bucketed)[0] == (48, 80) and pairs(bucketed)[2] == tuple(bucketed["image"].shape[1:])


def test_shapes_sizes_are_the_render_and_its_random_window():
    plain = ShapesDataset(4, 32, size_conditions=True)
    assert pairs(plain[1]) == ((32, 32), (0, 0), (32, 32))
    assert (
        torch.equal(plain[1]["image"], ShapesDataset(4, 32)[1]["image"])
        and "crop_coords_top_left" not in ShapesDataset(4, 32)[1]
    )
    cropped = ShapesDataset(8, 32, size_conditions=True, random_crop_margin=16)
    offsets = set()
    for i in range(8):
        item = cropped[i]
        original, (top, left), target = pairs(item)
        assert original == (48, 48) and target == (32, 32) and 0 <= top <= 16 and 0 <= left <= 16
        color, shape, background = cropped.combos[i % len(cropped.combos)]
        full = render(color, shape, background, 48, cropped.item_rng(i))
        window = (
            torch.from_numpy(full[top : top + 32, left : left + 32].copy()).permute(2, 0, 1).float() / 127.5
            - 1
        )
        assert torch.equal(item["image"], window)
        offsets.add((top, left))
    assert len(offsets) > 1
    with pytest.raises(ValueError, match="random_crop_margin"):
        ShapesDataset(4, 32, random_crop_margin=5)


def test_shapes_uncropped_fraction_keeps_some_items_whole_at_the_target_size():
    mixed = ShapesDataset(16, 32, size_conditions=True, random_crop_margin=8, uncropped_fraction=0.5)
    cropped = ShapesDataset(16, 32, size_conditions=True, random_crop_margin=8)
    kinds = set()
    for i in range(16):
        item, original, crop = mixed[i], *pairs(mixed[i])[:2]
        kinds.add(original)
        if original == (32, 32):  # whole: the plain render at the target size, crop (0, 0)
            color, shape, background = mixed.combos[i % len(mixed.combos)]
            assert crop == (0, 0) and not mixed.cropped(i)
            whole = torch.from_numpy(render(color, shape, background, 32, mixed.item_rng(i)).copy())
            assert torch.equal(item["image"], whole.permute(2, 0, 1).float() / 127.5 - 1)
        else:  # the others are exactly the items of the all-cropped data
            assert original == (40, 40) and mixed.cropped(i)
            assert torch.equal(item["image"], cropped[i]["image"]) and pairs(item) == pairs(cropped[i])
    assert kinds == {(32, 32), (40, 40)}
    assert mixed.fingerprint() != cropped.fingerprint()
    assert ShapesDataset(4, 32, random_crop_margin=8, uncropped_fraction=0.0).fingerprint() == (
        ShapesDataset(4, 32, random_crop_margin=8).fingerprint()
    )
    with pytest.raises(ValueError, match="uncropped_fraction"):
        ShapesDataset(4, 32, random_crop_margin=8, uncropped_fraction=1.5)
