"""Experiments inherit instead of repeat: conf/experiment/_finetune*.yaml hold what the fine-tuning
experiments share, are not runnable experiments themselves, and every fine-tune composes to the same core and
export."""

from __future__ import annotations

import pytest

from tests.conftest import CONF, EXPERIMENTS

BASES = {"_finetune", "_finetune_shapes", "_finetune_sd15", "_finetune_sdxl"}
NOT_FINETUNES = ("vae", "txt2img", "clip")  # txt2img_sdxl too
FINETUNES = [name for name in EXPERIMENTS if not name.startswith(NOT_FINETUNES)]
SD15 = [name for name in EXPERIMENTS if name.endswith("_sd15")]
SDXL = [name for name in EXPERIMENTS if name.endswith("_sdxl") and not name.startswith("txt2img")]
REAL_BASE = SD15 + SDXL  # the presets for a base the user gives


def test_bases_are_building_blocks_not_experiments():
    files = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert BASES <= files and not BASES & set(EXPERIMENTS)
    assert len(FINETUNES) == 19 and len(SD15) == 5 and len(SDXL) == 6  # pivotal_tuning(_sdxl): 18th, 19th


def test_the_finetune_defaults_pair_is_written_once():
    texts = {p.stem: p.read_text() for p in (CONF / "experiment").glob("*.yaml")}
    assert [n for n, t in texts.items() if "override /model: finetune" in t] == ["_finetune"]
    assert [n for n, t in texts.items() if "adapter_export]" in t] == ["_finetune"]
    inherits = {
        n
        for n, t in texts.items()
        if any(f"  - {b}\n" in t for b in BASES | {"dreambooth", "dreambooth_sd15", "dreambooth_sdxl"})
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
    elif experiment in SDXL:  # the SDXL real-base block: guidance 5.0, an SDXL base only, size conditions
        assert (cfg.model.ucg_rate, cfg.model.guidance_scale, cfg.model.base_family) == (0.0, 5.0, "sdxl")
        assert cfg.trainer.max_time is None and cfg.trainer.limit_val_batches == 0
        data = cfg.data if "concepts" in cfg.data else cfg.data.source
        assert data.size_conditions and data.resolution == 1024
    else:  # the embedded block: a step budget (max_time only a guard), the best val/loss kept
        assert cfg.trainer.max_steps > 0 and cfg.trainer.max_time == "00:00:45:00"
        assert cfg.trainer.check_val_every_n_epoch is None
        assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == (
            "val/loss",
            "min",
        )


@pytest.mark.parametrize("experiment", REAL_BASE)
def test_a_real_base_preset_requires_model_base(compose_cfg, experiment, tmp_path):
    """The *_sd15 / *_sdxl presets never fall back to a txt2img run of ours: without model.base the error
    names the key (a `???` in an experiment file is dropped by OmegaConf's merge, so: base_task: null)."""
    import hydra

    # an embedded txt2img run lies where the default search would look: it must not be picked up
    run = tmp_path / "logs" / "txt2img" / "runs" / "old" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"not used")
    cfg = compose_cfg([f"experiment={experiment}"])
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    with pytest.raises(FileNotFoundError, match=r"model\.base is required: .*model\.base="):
        model.resolve_base()
    assert model.resolve_base(fast_dev_run=True) is None  # the tiny random base stands in for a smoke run
