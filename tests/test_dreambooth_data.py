"""DreamBooth data: the embedded subject and its evaluator, instance/class datasets, class-image generation
and its on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from benchmarks.subject_fidelity import subject_prompts
from datamodules.class_images import SamplerSettings, cache_key, ensure_class_images, image_seed
from datamodules.dreambooth import Concept, DreamBoothDataModule
from datamodules.shapes import COLORS, Subject, _article, render, render_subject
from datamodules.shapes_evaluator import ShapesEvaluator

SUBJECTS = [Subject(), Subject("circle", ("red", "cyan"), "horizontal")]


def degrade(image: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(blurred, np.float32) + rng.normal(0, noise * 127.5, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def evaluator():
    return ShapesEvaluator()


def test_subject_render_is_the_shape_in_two_colour_halves():
    image = render_subject(Subject(colors=("yellow", "magenta")), "blue", 32)  # centred, 19.2 px box
    assert tuple(image[16, 9]) == COLORS["yellow"] and tuple(image[16, 22]) == COLORS["magenta"]
    assert tuple(image[1, 1]) == COLORS["blue"]
    top_bottom = render_subject(Subject("circle", ("red", "cyan"), "horizontal"), "white", 32)
    assert tuple(top_bottom[10, 16]) == COLORS["red"] and tuple(top_bottom[22, 16]) == COLORS["cyan"]
    with pytest.raises(ValueError, match="two palette colours"):
        Subject(colors=("red", "pink"))
    assert "yellow" not in Subject().backgrounds() and "blue" not in Subject().backgrounds(["blue"])


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.shape)
@pytest.mark.parametrize("blur,noise", [(0.0, 0.0), (1.0, 0.05), (1.5, 0.1)])
def test_evaluator_tells_the_subject_from_ordinary_class_members(evaluator, subject, blur, noise):
    rng = np.random.default_rng(0)
    backgrounds = subject.backgrounds()
    hits, false_hits = [], []
    for i in range(40):
        background = backgrounds[i % len(backgrounds)]
        image = render_subject(subject, background, 32, np.random.default_rng([1, i]))
        hits.append(evaluator.is_subject(degrade(image, blur, noise, rng) if blur else image, subject))
        # ordinary members of the class, including ones in either of the subject's colours
        color = [c for c in COLORS if c != background][i % 9]
        ordinary = render(color, subject.shape, background, 32, np.random.default_rng([2, i]))
        false_hits.append(
            evaluator.is_subject(degrade(ordinary, blur, noise, rng) if blur else ordinary, subject)
        )
    assert np.mean(hits) >= 0.95
    assert not any(false_hits)


def test_solid_subject_is_one_object_the_base_can_draw(evaluator):
    """Same colour twice: a named ordinary object (textual inversion's and hypernetworks' embedded
    concept)."""
    gem = Subject("diamond", ("magenta", "magenta"))
    assert gem.solid and not Subject().solid and "magenta" not in gem.backgrounds()
    image = render_subject(gem, "blue", 32, np.random.default_rng(3))
    assert np.array_equal(image, render("magenta", "diamond", "blue", 32, np.random.default_rng(3)))
    hits = [
        evaluator.is_subject(render_subject(gem, b, 32, np.random.default_rng([4, i])), gem)
        for i, b in enumerate(gem.backgrounds())
    ]
    assert np.mean(hits) >= 0.95
    others = [
        render("red", "diamond", "blue", 32),
        render("magenta", "square", "blue", 32),
        render_subject(Subject("diamond", ("magenta", "yellow")), "blue", 32),
    ]
    assert not any(evaluator.is_subject(image, gem) for image in others)


def test_evaluator_rejects_the_wrong_pattern(evaluator):
    subject = Subject("square", ("yellow", "magenta"), "vertical")
    mirrored = render_subject(Subject("square", ("magenta", "yellow"), "vertical"), "blue", 32)
    rotated = render_subject(Subject("square", ("yellow", "magenta"), "horizontal"), "blue", 32)
    other_shape = render_subject(Subject("circle", ("yellow", "magenta"), "vertical"), "blue", 32)
    assert evaluator.is_subject(render_subject(subject, "blue", 32), subject)
    assert not any(evaluator.is_subject(image, subject) for image in (mirrored, rotated, other_shape))
    assert evaluator.subject_rate(np.stack([render_subject(subject, "blue", 32), mirrored]), subject) == 0.5
    empty = np.full((32, 32, 3), 128, np.uint8)
    assert evaluator.read_halves(empty)["first"] is None and not evaluator.is_subject(empty, subject)


# ------------------------------------------------------------------------ class images and their cache


class CountingGenerator:
    """Stands in for the base model's sampler: a flat image whose value encodes its seed."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[int]]] = []

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        self.calls.append((list(prompts), list(seeds)))
        values = torch.tensor([seed % 200 / 100 - 1 for seed in seeds])
        return values[:, None, None, None].expand(len(prompts), 3, 8, 8).clone()

    @property
    def generated(self) -> int:
        return sum(len(p) for p, _ in self.calls)


def test_class_images_are_generated_once_reused_and_topped_up(tmp_path):
    settings = SamplerSettings(batch_size=3)
    prompts = ["a yellow square on a blue background", "a red square on a white background"]
    generate = CountingGenerator()
    paths = ensure_class_images(tmp_path, prompts, 4, generate, settings)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    seeds = [image_seed(0, i) for i in range(6)]  # each image its own seed
    # batches of 3
    assert generate.generated == 4 and [s for _, s in generate.calls] == [seeds[:3], seeds[3:4]]
    assert (tmp_path / "00001.txt").read_text() == prompts[1] and (
        tmp_path / "00002.txt"
    ).read_text() == prompts[0]
    before = {p.name: p.read_bytes() for p in paths}

    again = CountingGenerator()
    assert ensure_class_images(tmp_path, prompts, 4, again, settings) == paths and again.generated == 0
    assert ensure_class_images(tmp_path, prompts, 2, again, settings) == paths[:2] and again.generated == 0

    more = CountingGenerator()
    paths6 = ensure_class_images(tmp_path, prompts, 6, more, settings)
    assert more.calls == [([prompts[0], prompts[1]], seeds[4:6])]  # only the two missing ones
    assert {p.name: p.read_bytes() for p in paths6[:4]} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    (tmp_path / "00005.png").unlink()  # an interrupted write: the pair is incomplete, so it is redone
    redo = CountingGenerator()
    ensure_class_images(tmp_path, prompts, 6, redo, settings)
    assert redo.calls == [([prompts[1]], seeds[5:6])]


def test_class_image_cache_key_covers_what_shapes_the_images():
    settings, prompts = SamplerSettings(), ["a square"]
    key = cache_key("base0", prompts, settings, 32)
    assert key == cache_key("base0", prompts, SamplerSettings(batch_size=2), 32)  # batch size: same images
    changed = [
        cache_key("base1", prompts, settings, 32),
        cache_key("base0", ["a circle"], settings, 32),
        cache_key("base0", prompts, SamplerSettings(steps=10), 32),
        cache_key("base0", prompts, SamplerSettings(guidance_scale=5.0), 32),
        cache_key("base0", prompts, SamplerSettings(sampler="dpmpp_2m"), 32),
        cache_key("base0", prompts, SamplerSettings(seed=1), 32),
        cache_key("base0", prompts, settings, 64),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    # images seeded per index: never mixed with version 1
    assert SamplerSettings().key_parts()["version"] == 2


def class_image_pixels(folder, model, runs: list[tuple[int, int]]) -> list[np.ndarray]:
    """Class images after DreamBooth runs of (num_class_images, class_images.batch_size), one after
    another."""
    for count, batch_size in runs:
        data = DreamBoothDataModule(
            embedded_concepts(count),
            resolution=32,
            cache_latents=False,
            class_images={"sampler": "ddpm", "steps": 3, "batch_size": batch_size, "cache_dir": str(folder)},
        )
        data.setup("fit")
        data.prepare_class_images(model.data_services())
    (key_folder,) = [p for p in folder.iterdir() if p.is_dir()]
    return [np.asarray(Image.open(p)) for p in sorted(key_folder.glob("*.png"))]


def test_class_images_are_the_same_at_once_topped_up_or_in_other_batches(tmp_path):
    """Same key, same pixels: 6 images at once, 3 then topped up to 6, in batches of 4 (DDPM: fresh noise
    every step, so each image's per-step noise must not depend on its batch either)."""
    model = tiny_base()
    at_once = class_image_pixels(tmp_path / "at_once", model, [(6, 6)])
    topped_up = class_image_pixels(tmp_path / "topped_up", model, [(3, 6), (6, 6)])
    batches_of_4 = class_image_pixels(tmp_path / "batches_of_4", model, [(6, 4)])
    assert len(at_once) == len(topped_up) == len(batches_of_4) == 6
    for index, image in enumerate(at_once):
        assert np.array_equal(image, topped_up[index]), f"image {index} differs after a top-up"
        assert np.array_equal(image, batches_of_4[index]), f"image {index} differs with batch_size 4"
    assert not np.array_equal(at_once[0], at_once[2])  # same prompt, own noise


def tiny_base():
    from tests.test_latent_diffusion import tiny_model

    torch.manual_seed(0)
    return tiny_model(scale_factor=1.0, ema_decay=None).eval()


def embedded_concepts(num_class: int = 4):
    return [
        {
            "identifier": "sks",
            "subject": {"shape": "square", "colors": ["yellow", "magenta"]},
            "instance_backgrounds": ["blue", "green"],
            "num_instance_images": 3,
            "class_prompt": ["a yellow square on a blue background", "a red square on a white background"],
            "num_class_images": num_class,
        },
        {
            "identifier": "xyz",
            "subject": {"shape": "circle", "colors": ["red", "cyan"], "split": "horizontal"},
            "instance_backgrounds": ["black"],
            "num_instance_images": 2,
            "num_class_images": 0,
        },
    ]


def test_datamodule_instance_and_class_items_with_flags(tmp_path):
    data = DreamBoothDataModule(
        embedded_concepts(),
        resolution=32,
        cache_latents=False,
        class_images={"sampler": "ddim", "steps": 2, "batch_size": 4, "cache_dir": str(tmp_path)},
    )
    data.setup("fit")
    model = tiny_base()
    calls = []
    original = model.generate
    model.generate = lambda prompts, **kw: calls.append(len(prompts)) or original(prompts, **kw)
    data.prepare_class_images(model.data_services())
    assert calls == [4]
    items = [data.data_train[i] for i in range(len(data.data_train))]
    # concept sks: 3 instance images repeated to 4 + 4 class images; concept xyz: 2 instance images only
    flags = [item["is_regularization"] for item in items]
    assert len(items) == 10 and flags.count(True) == 4
    captions = [item["caption"] for item in items]
    assert captions.count("a sks square on a blue background") == 3  # images 0, 2 and the repeat of 0
    assert "a xyz circle on a black background" in captions
    assert {c for c, f in zip(captions, flags) if f} == {
        "a yellow square on a blue background",
        "a red square on a white background",
    }
    assert all(item["image"].shape == (3, 32, 32) for item in items)
    # validation: the subjects on backgrounds the instance images never had
    val_captions = {data.data_val[i]["caption"] for i in range(len(data.data_val))}
    assert "a sks square on a blue background" not in val_captions
    assert any(c.startswith("a sks square on") for c in val_captions)

    # a second run reuses the cache; a different base gets its own folder
    again = DreamBoothDataModule(
        embedded_concepts(),
        resolution=32,
        cache_latents=False,
        class_images={"sampler": "ddim", "steps": 2, "cache_dir": str(tmp_path)},
    )
    calls.clear()
    again.prepare_class_images(model.data_services())
    assert calls == [] and len(again.data_train) == 10
    other = tiny_base()
    with torch.no_grad():
        other.unet.out[-1].bias.add_(0.5)
    again = DreamBoothDataModule(
        embedded_concepts(),
        resolution=32,
        cache_latents=False,
        class_images={"sampler": "ddim", "steps": 2, "cache_dir": str(tmp_path)},
    )
    again.prepare_class_images(other.data_services())
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_datamodule_from_folders(tmp_path):
    from PIL import Image

    instances, classes = tmp_path / "dog", tmp_path / "dogs"
    for folder, count in ((instances, 3), (classes, 5)):
        folder.mkdir()
        for i in range(count):
            Image.new("RGB", (40, 48), (10 * i, 20, 30)).save(folder / f"{i}.png")
    (instances / "0.txt").write_text("a photo of sks dog on the beach")
    concepts = [
        {
            "identifier": "sks",
            "class_noun": "dog",
            "instance_dir": str(instances),
            "class_dir": str(classes),
            "class_prompt": "a photo of a {class_noun}",
            "num_class_images": 4,
        }
    ]
    data = DreamBoothDataModule(concepts, resolution=32, cache_latents=False)
    data.prepare_class_images(None)  # class images from a folder: no model needed
    items = [data.data_train[i] for i in range(len(data.data_train))]
    assert len(items) == 8 and sum(item["is_regularization"] for item in items) == 4
    captions = [item["caption"] for item in items]
    assert captions.count("a photo of sks dog on the beach") == 2  # sidecar caption (image 0 and its repeat)
    assert captions.count("a sks dog") == 2 and captions.count("a photo of a dog") == 4
    # one instance prompt for every image
    concepts[0]["instance_prompt"] = "a photo of {identifier} {class_noun}"
    data = DreamBoothDataModule(concepts, resolution=32, cache_latents=False)
    data.prepare_class_images(None)
    assert {data.data_train[i]["caption"] for i in range(4)} == {"a photo of sks dog"}


def test_concept_errors_are_actionable():
    with pytest.raises(ValueError, match="exactly one of instance_dir"):
        DreamBoothDataModule([{"identifier": "sks"}])
    with pytest.raises(ValueError, match="class_noun is required"):
        DreamBoothDataModule([{"instance_dir": "x"}])
    with pytest.raises(ValueError, match="own identifier"):
        DreamBoothDataModule([{"subject": {}}, {"subject": {"shape": "circle"}}])
    with pytest.raises(ValueError, match="unknown DreamBooth concept key"):
        DreamBoothDataModule([{"subject": {}, "instance_images": 3}])
    with pytest.raises(ValueError, match="instance_backgrounds"):
        DreamBoothDataModule([{"subject": {}, "instance_backgrounds": ["yellow"]}])


def test_captions_without_the_background_are_evaluated_in_context():
    """Instance captions "a sks square" (one background, not named: the case masked loss exists for) train as
    written; validation and evaluation still ask for the subject on a named, unseen background."""
    concept = Concept.from_config(
        {
            "identifier": "sks",
            "subject": {"shape": "square", "colors": ["yellow", "magenta"]},
            "instance_prompt": "a photo of {identifier} {class_noun}",
            "instance_backgrounds": ["blue"],
            "num_instance_images": 2,
        }
    )
    data = DreamBoothDataModule([concept], resolution=32, cache_latents=False, val_size=4)
    data.setup("fit")
    assert {data.data_train[i]["caption"] for i in range(2)} == {"a photo of sks square"}
    val = [data.data_val[i]["caption"] for i in range(4)]
    backgrounds = concept.eval_backgrounds()
    assert val == [f"a sks square on {_article(b)} {b} background" for b in backgrounds[:4]]
    assert subject_prompts(concept, 2) == val[:2]
    named = Concept.from_config(
        {**vars(concept), "instance_prompt": "a {identifier} thing on {a_background}"}
    )
    assert named.context_caption("red") == named.instance_caption("red") == "a sks thing on a red"
