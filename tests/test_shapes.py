"""The embedded shapes dataset, its splits, its datamodule and its evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from datamodules.shapes import (
    COLORS,
    SHAPES,
    SPLITS,
    Layout,
    ShapesDataModule,
    ShapesDataset,
    all_combos,
    caption_for,
    parse_caption,
    render,
    split_combos,
)
from datamodules.shapes_evaluator import ShapesEvaluator


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def degrade(tensor: torch.Tensor, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (``blur`` pixels at 32 px, scaled with resolution) + Gaussian noise
    (std ``noise`` in [-1, 1] units), like a soft generative model."""
    resolution = tensor.shape[-1]
    image = Image.fromarray(to_uint8(tensor)).filter(ImageFilter.GaussianBlur(blur * resolution / 32))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, noise * 127.5, (resolution, resolution, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def split_samples(resolution: int, per_split: int, seed: int = 5):
    items = []
    for split in SPLITS:
        dataset = ShapesDataset(per_split, resolution, seed=seed, split=split)
        items += [dataset[k] for k in range(per_split)]
    return [item["image"] for item in items], [item["caption"] for item in items]


@pytest.fixture(scope="module")
def evaluator():
    return ShapesEvaluator()


# ------------------------------------------------------------------------ vocabulary, captions


def test_palette_is_well_separated():
    assert list(COLORS) == [
        "red",
        "green",
        "blue",
        "yellow",
        "orange",
        "purple",
        "cyan",
        "magenta",
        "white",
        "black",
    ]
    rgb = np.asarray(list(COLORS.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert distances.min() > 80
    assert SHAPES == ("circle", "square", "triangle", "diamond", "cross", "star")


def test_caption_round_trip():
    combos = all_combos()
    assert len(combos) == 10 * 6 * 9 and all(c != b for c, _, b in combos)
    for combo in combos:
        assert parse_caption(caption_for(*combo)) == combo
    assert caption_for("red", "circle", "blue") == "a red circle on a blue background"
    assert caption_for("orange", "star", "orange") == "an orange star on an orange background"
    assert parse_caption("A Red circle on a blue background.") == ("red", "circle", "blue")
    assert parse_caption("a red circle on an blue background") == ("red", "circle", "blue")
    for bad in (
        "a teal circle on a blue background",
        "a red hexagon on a blue background",
        "a red circle",
        "",
        "a photo of a dog",
    ):
        assert parse_caption(bad) is None


# --------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("resolution", [16, 24, 32, 64])
def test_render_colours_and_geometry(resolution):
    layout = Layout(resolution * 0.2, resolution * 0.2, resolution * 0.6, resolution * 0.6)
    for shape in SHAPES:
        image = render("red", shape, "blue", resolution, layout)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == COLORS["blue"] and tuple(image[-1, -1]) == COLORS["blue"]
        centre = resolution // 2
        assert tuple(image[centre, centre]) == COLORS["red"]
        # anti-aliased: some edge pixels are mixtures of the two colours
        mixed = ~np.all(image == COLORS["red"], -1) & ~np.all(image == COLORS["blue"], -1)
        assert mixed.any()


def test_shapes_fit_inside_with_margin():
    dataset = ShapesDataset(300, 32, split="train")
    for k in range(300):
        item = dataset[k]
        image = to_uint8(item["image"])
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.all(border == COLORS[item["background"]]), k
        fg = np.all(image == COLORS[item["color"]], -1).mean()
        assert fg > 0.04  # large enough to read at 32 px


def test_invalid_arguments():
    for resolution in (8, 20, 33):
        with pytest.raises(ValueError):
            ShapesDataset(4, resolution)
    with pytest.raises(ValueError):
        ShapesDataset(4, 32, split="test")
    with pytest.raises(ValueError):
        ShapesDataset(4, 32, holdout_concepts=["hexagon"])
    with pytest.raises(ValueError):
        render("teal", "circle", "blue", 32)


# ------------------------------------------------------------------------------ determinism


def test_deterministic_by_seed_and_index():
    a, b = ShapesDataset(50, 32, seed=3), ShapesDataset(50, 32, seed=3)
    for k in (0, 7, 49, 13):  # any access order
        assert torch.equal(a[k]["image"], b[k]["image"]) and a[k]["caption"] == b[k]["caption"]
    other = ShapesDataset(50, 32, seed=4)
    assert sum(not torch.equal(a[k]["image"], other[k]["image"]) for k in range(20)) >= 18
    assert a[-1]["caption"] == a[49]["caption"]
    with pytest.raises(IndexError):
        a[50]


def test_same_items_with_workers():
    dataset = ShapesDataset(16, 32, seed=1)
    serial = next(iter(DataLoader(dataset, batch_size=16)))
    parallel = torch.cat([b["image"] for b in DataLoader(dataset, batch_size=4, num_workers=2)])
    assert torch.equal(serial["image"], parallel)


@pytest.mark.parametrize("resolution", [32, 64])
def test_item_format(resolution):
    item = ShapesDataset(4, resolution)[0]
    assert set(item) == {"image", "caption", "color", "shape", "background"}
    image = item["image"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, resolution, resolution)
    assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()
    assert item["caption"] == caption_for(item["color"], item["shape"], item["background"])


# ------------------------------------------------------------------------------------ splits


def test_splits_partition_the_combinations():
    train, val, heldout, concept = (set(split_combos(s, seed=0)) for s in SPLITS)
    assert train == val
    assert not train & heldout and not train & concept and not heldout & concept
    assert train | heldout | concept == set(all_combos())
    assert all("star" in combo for combo in concept) and len(concept) == 10 * 9
    assert not any("star" in combo for combo in train | heldout)
    assert len(heldout) == round(0.1 * (540 - 90))
    # every word still seen in training, so held-out combos test composition only
    assert {c for c, _, _ in train} == set(COLORS) and {s for _, s, _ in train} == set(SHAPES) - {"star"}
    # the held-out subset is fixed by the seed and nothing else
    assert set(split_combos("heldout", seed=0)) == heldout
    assert set(split_combos("heldout", seed=1)) != heldout


def test_dataset_items_respect_splits():
    train = ShapesDataset(500, 32, split="train")
    val = ShapesDataset(100, 32, split="val")
    heldout_set = set(split_combos("heldout"))
    captions = [train[k]["caption"] for k in range(500)]
    assert not any("star" in c.split() for c in captions)
    assert not {parse_caption(c) for c in captions} & heldout_set
    assert len(set(captions)) == 405  # cycles through every training combination
    # val shares combinations, never item seeds
    assert all(not torch.equal(train[k]["image"], val[k]["image"]) for k in range(100))
    concept = ShapesDataset(50, 32, split="concept")
    assert all(concept[k]["shape"] == "star" for k in range(50))
    heldout = ShapesDataset(50, 32, split="heldout")
    assert all(
        (heldout[k]["color"], heldout[k]["shape"], heldout[k]["background"]) in heldout_set for k in range(50)
    )


def test_colour_concept_holdout():
    train = set(split_combos("train", holdout_concepts=["purple"]))
    concept = set(split_combos("concept", holdout_concepts=["purple"]))
    assert not any("purple" in combo for combo in train)
    assert all(combo[0] == "purple" or combo[2] == "purple" for combo in concept)
    assert len(concept) == 6 * 9 * 2  # purple as foreground or as background
    dataset = ShapesDataset(200, 32, split="train", holdout_concepts=["purple", "star"])
    assert not any({"purple", "star"} & set(dataset[k]["caption"].split()) for k in range(200))
    assert split_combos("concept", holdout_concepts=[]) == []
    with pytest.raises(ValueError):
        ShapesDataset(4, 32, split="concept", holdout_concepts=[])


# -------------------------------------------------------------------------------- datamodule


def test_datamodule_loaders_and_prompts():
    module = ShapesDataModule(resolution=32, batch_size=8, train_size=64, val_size=16)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert tuple(batch["image"].shape) == (8, 3, 32, 32)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 8
    assert len(module.val_dataloader().dataset) == 16
    test_batch = next(iter(module.test_dataloader()))
    heldout = set(split_combos("heldout"))
    assert all(parse_caption(c) in heldout for c in test_batch["caption"])

    prompts = module.prompts()
    assert len(prompts) == len(set(prompts)) == len(heldout)
    assert {parse_caption(p) for p in prompts} == heldout
    assert len(module.prompts(n=100)) == 100 and module.prompts(n=5) == prompts[:5]
    assert all("star" in p for p in module.prompts("concept"))


def test_datamodule_concept_finetuning():
    module = ShapesDataModule(resolution=32, batch_size=4, train_size=16, val_size=8, train_split="concept")
    module.setup("fit")
    train = [module.data_train[k] for k in range(8)]
    val = [module.data_val[k] for k in range(8)]
    assert all(item["shape"] == "star" for item in train + val)
    assert all(not torch.equal(t["image"], v["image"]) for t, v in zip(train, val))


# --------------------------------------------------------------------------------- evaluator


@pytest.mark.parametrize("resolution", [32, 64])
def test_evaluator_reads_clean_images(evaluator, resolution):
    images, captions = split_samples(resolution, per_split=100)
    scores = evaluator.score(torch.stack(images), captions)
    assert scores["n"] == len(captions)
    assert scores["fidelity"] == 1.0, scores  # the README's claim: 100% on the dataset's own images
    assert scores["background_acc"] == 1.0, scores


@pytest.mark.parametrize("resolution,blur,min_fidelity", [(32, 1.0, 1.0), (64, 1.0, 1.0), (32, 2.0, 0.95)])
def test_evaluator_robust_to_blur_and_noise(evaluator, resolution, blur, min_fidelity):
    """The README's claims: 100% after blur sigma 1 px + noise, >= 95% after blur sigma 2 px + noise."""
    images, captions = split_samples(resolution, per_split=40 if resolution == 64 else 60, seed=6)
    rng = np.random.default_rng(0)
    degraded = [degrade(image, blur=blur, noise=0.1, rng=rng) for image in images]
    scores = evaluator.score(degraded, captions)
    assert scores["fidelity"] >= min_fidelity, scores
    assert scores["color_acc"] >= 0.99 and scores["background_acc"] >= 0.99, scores


def test_evaluator_low_on_wrong_captions(evaluator):
    images, captions = split_samples(32, per_split=50)
    shuffled = [captions[k] for k in np.random.default_rng(0).permutation(len(captions))]
    assert evaluator.score(images, shuffled)["fidelity"] < 0.2
    # only the colour right, or only the shape right, is not fidelity
    item = ShapesDataset(1, 32)[0]
    other_shape = next(s for s in SHAPES if s != item["shape"])
    other_color = next(c for c in COLORS if c not in (item["color"], item["background"]))
    wrong = [
        caption_for(item["color"], other_shape, item["background"]),
        caption_for(other_color, item["shape"], item["background"]),
    ]
    scores = evaluator.score([item["image"]] * 2, wrong)
    assert scores["fidelity"] == 0.0 and scores["color_acc"] == 0.5 and scores["shape_acc"] == 0.5


def test_evaluator_empty_and_odd_inputs(evaluator):
    blank = np.full((32, 32, 3), COLORS["green"], dtype=np.uint8)
    assert evaluator.read(blank) == {"color": None, "shape": None, "background": "green"}
    scores = evaluator.score([blank], ["a red circle on a green background"])
    assert scores["fidelity"] == 0.0 and scores["background_acc"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    evaluator.read(noise)  # must not crash; any answer is fine
    speck = blank.copy()
    speck[10, 10] = COLORS["red"]  # a single pixel is not a shape
    assert evaluator.read(speck)["shape"] is None
    with pytest.raises(ValueError):
        evaluator.score([blank], ["a photo of a dog"])
    assert evaluator.score([], [])["n"] == 0


def test_evaluator_input_types_agree(evaluator):
    item = ShapesDataset(1, 64, seed=2)[0]
    expected = {"color": item["color"], "shape": item["shape"], "background": item["background"]}
    array = to_uint8(item["image"])
    assert evaluator.read(item["image"]) == expected
    assert evaluator.read(array) == expected
    assert evaluator.read(Image.fromarray(array)) == expected
    assert evaluator.read(array.astype(np.float32) / 255) == expected
    assert evaluator.read_batch(item["image"][None]) == [expected]
