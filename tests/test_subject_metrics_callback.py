"""The subject-metrics callback (callbacks/subject_metrics.py) in a short LoRA fine-tune: val/clip_t,
val/clip_i, val/dino in the csv log, and a checkpoint chosen by val/dino."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from omegaconf.errors import MissingMandatoryValue

from tests.metric_models import save_clip, save_dino
from tests.test_hypernetwork import tiny_lightning_checkpoint
from train import train

PARTS = [
    "experiment=lora_finetune",
    "model/sampler=ddim",
    "model.sampler.steps=2",
    "callbacks.rich_progress_bar=null",
    "debug=smoke",
    "trainer.max_steps=2",
    "data.source.train_size=8",
    "data.source.val_size=4",
    "data.batch_size=4",
    "data.cache_dir=null",
    "data.source.resolution=16",
    "model.log_prompts=[a red star on a blue background,a green circle on a white background]",
    "+callbacks=subject_metrics",
    "callbacks.subject_metrics.steps=2",
    "callbacks.subject_metrics.images_per_prompt=2",
    "callbacks.subject_metrics.subject_match=star",
]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_callback")
    return {
        "base": tiny_lightning_checkpoint(root / "last.ckpt"),
        "clip": save_clip(root / "clip"),
        "dino": save_dino(root / "dino"),
    }


def test_callback_logs_the_metrics_to_csv_and_can_choose_the_checkpoint(compose_cfg, parts):
    cfg = compose_cfg(
        [
            *PARTS,
            f"model.base={parts['base']}",
            f"callbacks.subject_metrics.clip={parts['clip']}",
            f"callbacks.subject_metrics.dino={parts['dino']}",
            "callbacks.model_checkpoint.monitor=val/dino",
            "callbacks.model_checkpoint.mode=max",
        ]
    )
    _, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    with open(run / "csv" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged = [r for r in rows if r.get("val/dino")]
    assert len(logged) == 1 and logged[0]["step"] == "1"  # one validation, after step 2
    values = {k: float(logged[0][k]) for k in ("val/clip_t", "val/clip_i", "val/dino")}
    assert all(math.isfinite(v) for v in values.values()) and -1 <= values["val/dino"] <= 1
    callback = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "SubjectMetricsLogger")
    assert callback.references.shape[0] == 8 and callback.history[-1]["dino"] == pytest.approx(
        values["val/dino"]
    )
    checkpoint = objects["trainer"].checkpoint_callback
    assert checkpoint.monitor == "val/dino" and float(checkpoint.best_model_score) == pytest.approx(
        values["val/dino"]
    )
    assert (run / "images" / "metrics_step000002.png").is_file()


def test_callback_without_or_with_a_wrong_model_names_the_key(compose_cfg, parts):
    with pytest.raises(MissingMandatoryValue, match="callbacks.subject_metrics.clip"):
        train(compose_cfg([*PARTS, f"model.base={parts['base']}"]))
    cfg = compose_cfg(
        [*PARTS, f"model.base={parts['base']}", f"callbacks.subject_metrics.clip={parts['dino']}"]
    )
    with pytest.raises(Exception, match=r"callbacks.subject_metrics.clip=.*dino: not a CLIPModel"):
        train(cfg)
