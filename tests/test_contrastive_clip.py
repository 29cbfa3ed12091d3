"""experiment=clip: a small CLIP trained contrastively on the shapes data, saved as a CLIPModel folder that
the metrics load as --clip and txt2img conditions on (frozen text tower)."""

from __future__ import annotations

import pytest
import torch

from datamodules.shapes import ShapesDataset
from ldm.modules.shapes_clip import ShapesCLIP, retrieval_accuracy
from ldm.modules.subject_metrics import SubjectMetrics
from ldm.modules.text_encoder import CLIPTextEncoder
from tests.conftest import load_script
from tests.test_train import TINY
from train import train

TINY_CLIP = ["experiment=clip", "data.train_size=32", "data.val_size=16", "data.batch_size=8"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    from tests.conftest import compose_train

    cfg = compose_train(tmp_path_factory.mktemp("clip"), [*TINY_CLIP, "debug=fdr"])
    metrics, objects = train(cfg)
    return cfg, metrics, objects


def test_fast_dev_run_logs_retrieval_and_saves_a_clip_folder(clip_run):
    _, metrics, objects = clip_run
    assert {"train/loss", "val/loss", "val/retrieval"} <= set(metrics)
    folder = objects["model"].hparams.export_dir
    assert folder.endswith("/clip")
    scores = SubjectMetrics.from_paths(clip=folder)  # loads as any CLIP would: the metrics' --clip
    images = torch.stack([torch.as_tensor(ShapesDataset(2, 32, 0, "val")[i]["image"]) for i in range(2)])
    assert 0.0 <= scores.clip_t(images, ["a red circle on a blue background"] * 2) <= 1.0
    trained = objects["model"].clip.model.text_model.state_dict()
    loaded = scores.clip_model.text_model.state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    retrieval = load_script("benchmarks/clip_retrieval.py").main(["--clip", folder, "--n", "16"])
    assert set(retrieval) == {"val", "heldout"} and all(0 <= r["top1"] <= 1 for r in retrieval.values())


def test_txt2img_conditions_on_the_frozen_text_tower(clip_run, compose_cfg):
    folder = clip_run[2]["model"].hparams.export_dir
    cfg = compose_cfg(
        [
            *TINY["txt2img"],
            "experiment=txt2img",
            "model/text_encoder=shapes_clip",  # experiment=txt2img's default (TINY picks the random one)
            f"model.conditioner.embedders.0.module.path={folder}/text_encoder",
            "debug=fdr",
        ]
    )
    _, objects = train(cfg)
    encoder = objects["model"].text_encoder
    assert isinstance(encoder, CLIPTextEncoder) and not any(p.requires_grad for p in encoder.parameters())
    tower = clip_run[2]["model"].clip.text_tower()
    tokens = encoder.tokenize(["a red star"])
    assert torch.equal(encoder(["a red star"]), tower(input_ids=tokens).last_hidden_state)
    assert encoder(["a red star"]).shape == (1, 20, 64)  # the embedded text encoder's context


def test_retrieval_accuracy_is_top1_among_distinct_captions():
    captions = ["a", "b", "a", "c"]
    table = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}

    def text_of(prompts):
        return torch.tensor([table[p] for p in prompts])

    right = text_of(captions)
    assert retrieval_accuracy(right, captions, text_of) == 1.0
    assert retrieval_accuracy(right.roll(1, 0), captions, text_of) == 0.0


def test_contrastive_steps_learn_to_retrieve():
    torch.manual_seed(0)
    clip = ShapesCLIP(seed=0)
    data = ShapesDataset(8, 32, 0, "train")
    items = [data[i] for i in range(8)]
    images = torch.stack([torch.as_tensor(item["image"]) for item in items])
    captions = [item["caption"] for item in items]

    def accuracy() -> float:
        with torch.no_grad():
            return retrieval_accuracy(clip.image_features(images), captions, clip.text_features)

    before = accuracy()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=2e-3)
    for _ in range(40):
        loss = clip.loss(images, captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy() >= 0.75 > before
