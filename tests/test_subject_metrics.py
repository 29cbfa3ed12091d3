"""CLIP-T, CLIP-I, DINO, PRES and DIV (``ldm.modules.subject_metrics``) on tiny CLIP / DINO folders built
here."""

from __future__ import annotations

import pytest
import torch

from ldm.modules.subject_metrics import (
    MetricModelError,
    SubjectMetrics,
    load_clip,
    load_dino,
    mean_pairwise_cosine,
)
from tests.metric_models import COLOURS, save_clip, save_dino, solid

CAPTIONS = [f"a {c} background" for c in COLOURS]
IMAGES = torch.stack([solid(c) for c in COLOURS])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return save_clip(root / "clip", trained=True), save_dino(root / "dino")


@pytest.fixture(scope="module")
def metrics(folders):
    return SubjectMetrics.from_paths(*folders)


def test_identical_images_score_one(metrics):
    assert metrics.clip_i(IMAGES[:1], IMAGES[:1]) == pytest.approx(1.0, abs=1e-5)
    assert metrics.dino(IMAGES[:2], IMAGES[:2]) < 1.0  # the mean over all pairs, the cross pairs included
    assert metrics.dino(IMAGES[:1], IMAGES[:1]) == pytest.approx(1.0, abs=1e-5)


def test_other_images_score_lower(metrics):
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    red, blue = noise[:1], noise[1:]
    assert metrics.dino(red, blue) < metrics.dino(red, red) - 0.01
    assert metrics.clip_i(red, blue) < metrics.clip_i(red, red)  # a tiny CLIP's image tower varies little
    # PRES: class samples that look like the subject score higher (prior lost) than ones that do not
    assert metrics.pres(torch.cat([red, red]), red) > metrics.pres(torch.cat([blue, blue]), red)


def test_mean_pairwise_cosine_pairs_every_sample_with_every_reference():
    samples = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    references = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    expected = (1 + 2**-0.5 + 0 + 0 + 2**-0.5 - 1) / 6
    assert mean_pairwise_cosine(samples, references) == pytest.approx(expected)


def test_clip_t_prefers_the_right_caption(metrics):
    right = metrics.clip_t(IMAGES, CAPTIONS)
    shuffled = metrics.clip_t(IMAGES, CAPTIONS[1:] + CAPTIONS[:1])
    assert right > 0.2 and right > shuffled + 0.1


def test_subject_gives_every_metric(metrics):
    values = metrics.subject(IMAGES[:2], CAPTIONS[:2], references=IMAGES[:1])
    assert set(values) == {"clip_t", "clip_i", "dino"} == set(metrics.names)
    assert set(metrics.subject(IMAGES[:2], CAPTIONS[:2], references=None)) == {"clip_t"}


def test_div_is_the_mean_pairwise_distance():
    distance = SubjectMetrics(lpips=lambda x, y: (x - y).abs().mean(dim=(1, 2, 3)))
    assert distance.div(torch.stack([IMAGES[0]] * 3)) == 0.0
    assert distance.div(IMAGES[:2]) == pytest.approx(4 / 3)  # red vs green: 2 of 3 channels differ by 2
    with pytest.raises(MetricModelError, match="--lpips"):
        SubjectMetrics().div(IMAGES[:2])


def test_missing_or_wrong_folders_name_the_flag(tmp_path, folders):
    clip, dino = folders
    with pytest.raises(MetricModelError, match=r"^--clip is not set"):
        load_clip(None)
    with pytest.raises(MetricModelError, match=r"--dino=.*nope: no DINO"):
        load_dino(tmp_path / "nope")
    with pytest.raises(MetricModelError, match=r"callbacks.metrics.clip="):
        load_clip(dino, "callbacks.metrics.clip")
    with pytest.raises(MetricModelError, match=r"--dino=.*not a DINO ViT"):
        load_dino(clip)
