"""DreamBooth data: the embedded subject and its evaluator, instance/class datasets, class-image generation
and its on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from datamodules.shapes import COLORS, Subject, render, render_subject
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
    with pytest.raises(ValueError, match="two different palette colours"):
        Subject(colors=("red", "red"))
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
        false_hits.append(evaluator.is_subject(degrade(ordinary, blur, noise, rng) if blur else ordinary, subject))
    assert np.mean(hits) >= 0.95
    assert not any(false_hits)


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
