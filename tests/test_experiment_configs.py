"""Experiments inherit instead of repeat: conf/experiment/_finetune*.yaml hold what the fine-tuning
experiments share, are not runnable experiments themselves, and every fine-tune composes to the same core and
export."""

from __future__ import annotations

import pytest

from tests.conftest import CONF, EXPERIMENTS

BASES = {"_finetune", "_finetune_shapes", "_finetune_sd15"}
FINETUNES = [name for name in EXPERIMENTS if not name.startswith(("vae", "txt2img"))]  # txt2img_sdxl too
SD15 = [name for name in EXPERIMENTS if name.endswith("_sd15")]


def test_bases_are_building_blocks_not_experiments():
    files = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert BASES <= files and not BASES & set(EXPERIMENTS)
    assert len(FINETUNES) == 12 and len(SD15) == 5


def test_the_finetune_defaults_pair_is_written_once():
    texts = {p.stem: p.read_text() for p in (CONF / "experiment").glob("*.yaml")}
    assert [n for n, t in texts.items() if "override /model: finetune" in t] == ["_finetune"]
    assert [n for n, t in texts.items() if "adapter_export]" in t] == ["_finetune"]
    inherits = {
        n
        for n, t in texts.items()
        if any(f"  - {b}\n" in t for b in BASES | {"dreambooth", "dreambooth_sd15"})
    }
    assert set(FINETUNES) <= inherits


@pytest.mark.parametrize("experiment", FINETUNES)
def test_every_finetune_gets_the_core_and_the_export(compose_cfg, experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.model._target_ == "ldm.models.finetune.module.FineTuneModule"
    assert cfg.callbacks.adapter_export._target_ == "callbacks.adapter_export.AdapterExport"
    # the real-base block: no caption dropout, guidance 7.5, no demo limits, no validation
    if experiment in SD15:
        assert (cfg.model.ucg_rate, cfg.model.guidance_scale, cfg.model.scheduler.warmup_steps) == (
            0.0,
            7.5,
            0,
        )
        assert (
            cfg.trainer.max_time,
            cfg.trainer.limit_val_batches,
            cfg.callbacks.model_checkpoint.monitor,
        ) == (None, 0, None)
    else:  # the embedded block: a step budget (max_time only a guard), the best val/loss kept
        assert cfg.trainer.max_steps > 0 and cfg.trainer.max_time == "00:00:45:00"
        assert cfg.trainer.check_val_every_n_epoch is None
        assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == (
            "val/loss",
            "min",
        )
