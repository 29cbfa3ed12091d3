"""A checkpoint never chooses what code runs: ``model_config`` is built only from an allowlist of our own
classes (ldm/models/model_config.py), checked as a whole before anything is called."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ldm.models.checkpoint import load_lightning_model
from ldm.models.model_config import ALLOWED_TARGETS, UnsafeConfigError, build_from_config, check_config
from ldm.utils.task import run_main, run_task
from tests.conftest import CONF, compose_train, load_script
from train import train


def conf_model_targets() -> set[str]:
    """Every ``_target_`` under conf/model (the configs a checkpoint's model_config is made of)."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (CONF / "model").rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return found


def test_every_model_config_target_is_allowlisted_and_resolves():
    targets = conf_model_targets()
    assert len(targets) >= 15
    missing = targets - set(ALLOWED_TARGETS)
    assert not missing, f"add these to ldm/models/model_config.py ALLOWED_TARGETS: {sorted(missing)}"
    for target in ALLOWED_TARGETS:  # every entry names something real (a typo would refuse our own files)
        check_config({"_target_": target, "_partial_": True}, "test")
        assert callable(build_from_config({"_target_": target, "_partial_": True}, "test"))


def payloads(marker: Path, victim: Path) -> dict[str, dict]:
    """Configs that, handed to hydra.utils.instantiate, write ``marker`` or delete ``victim``."""
    return {
        "builtins.open": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        "os.makedirs": {"_target_": "os.makedirs", "name": str(marker)},
        "shutil.rmtree": {"_target_": "shutil.rmtree", "path": str(victim)},
        "pathlib.Path.write_text (nested)": {
            "_target_": "ldm.models.latent_diffusion.LatentDiffusion",
            "unet": {
                "_target_": "pathlib.Path.write_text",
                "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
                "data": "pwned",
            },
        },
        "ldm function that is not a model": {
            "_target_": "ldm.models.finetune.module.FineTuneModule",
            "method": {"_target_": "ldm.utils.files.atomic_write_text", "path": str(marker), "text": "pwned"},
        },
        "an allowed target's module prefix": {
            "_target_": "ldm.models.latent_diffusion.os.makedirs",
            "name": str(marker),
        },
        "a list item": {
            "_target_": "ldm.modules.unet.UNetModel",
            "channel_mult": [1, {"_target_": "os.makedirs", "name": str(marker)}],
        },
        "a hydra key we never write": {
            "_target_": "ldm.modules.unet.UNetModel",
            "_args_": [{"_target_": "os.makedirs", "name": str(marker)}],
        },
    }


def poisoned_checkpoint(path: Path, model_config: dict) -> Path:
    """Pickle-free (plain types only, loads with weights_only=True) and otherwise well-formed."""
    torch.save(
        {"state_dict": {"unet.w": torch.zeros(1)}, "global_step": 1, "model_config": model_config}, path
    )
    return path


@pytest.fixture
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("still here")
    return folder


@pytest.mark.parametrize("name", list(payloads(Path("m"), Path("v"))))
def test_poisoned_model_config_is_refused_before_anything_runs(tmp_path, victim, name):
    marker = tmp_path / "pwned"
    evil = poisoned_checkpoint(tmp_path / "evil.ckpt", payloads(marker, victim)[name])
    with pytest.raises(UnsafeConfigError, match=r"evil\.ckpt: refusing to build its config: model_config\S*"):
        load_lightning_model(evil)
    assert not marker.exists()
    assert (victim / "keep.txt").is_file()


def test_the_refusal_names_the_nested_key(tmp_path, victim):
    config = payloads(tmp_path / "pwned", victim)["pathlib.Path.write_text (nested)"]
    with pytest.raises(
        UnsafeConfigError, match=r"model_config\.unet\._target_ names 'pathlib\.Path\.write_text'"
    ):
        check_config(config, "x.ckpt")


@pytest.mark.parametrize(
    "config",
    [
        "a string",
        {"no": "target"},
        {"_target_": "ldm.modules.unet.UNetModel"},
        {"_target_": "torch.optim.SGD"},
    ],
)
def test_a_checkpoint_config_must_build_one_of_our_lightning_modules(tmp_path, config):
    evil = poisoned_checkpoint(tmp_path / "odd.ckpt", config)
    with pytest.raises(
        UnsafeConfigError, match=r"odd\.ckpt: refusing to build its config: model_config\._target_"
    ):
        load_lightning_model(evil)


@pytest.mark.parametrize("value", [b"bytes", torch.zeros(1), {1: "int key"}, {"_partial_": "yes"}])
def test_only_plain_data_is_accepted(value):
    with pytest.raises(UnsafeConfigError):
        check_config({"_target_": "ldm.modules.unet.UNetModel", "x": value}, "x.ckpt")


def test_builds_what_hydra_builds(tmp_path):
    """The allowlisted builder gives the same objects as instantiate for a real config (partials too)."""
    cfg = compose_train(tmp_path, ["experiment=txt2img", "model/text_encoder=tiny", "debug=smoke"])
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_from_config(config, "test")
    assert type(model).__name__ == "LatentDiffusion"
    assert model.optimizer_factory.func is torch.optim.AdamW
    assert model.optimizer_factory.keywords["lr"] == config["optimizer"]["lr"]
    assert sum(p.numel() for p in model.unet.parameters()) > 0


def entry_points(evil: Path, tmp_path: Path) -> dict:
    """Every script that reads a checkpoint's config: name -> (its main, the arguments that give it
    ``evil``)."""
    run = tmp_path / "planted_run"  # a run folder whose saved config names the poisoned base
    (run / ".hydra").mkdir(parents=True)
    (run / "adapters").mkdir()
    (run / "adapters" / "lora.safetensors").write_bytes(b"")
    (run / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(evil), "method": {"_target_": "ldm.models.finetune.lora.LoRA"}},
                "data": {"concepts": []},
            }
        )
    )
    return {
        "sample.py --ckpt": (
            load_script("sample.py").main,
            ["--ckpt", str(evil), "--prompt", "x", "--out", str(tmp_path / "out")],
        ),
        "scripts/convert.py --base": (
            load_script("scripts/convert.py").main,
            ["--base", str(evil), "--out", str(tmp_path / "o.safetensors")],
        ),
        "benchmarks/fidelity.py --ckpt": (
            load_script("benchmarks/fidelity.py").main,
            ["--ckpt", str(evil), "--n", "2"],
        ),
        "benchmarks/sampling.py --ckpt": (
            load_script("benchmarks/sampling.py").main,
            ["--part", "fidelity", "--ckpt", str(evil)],
        ),
        "benchmarks/dreambooth_step.py --base": (
            load_script("benchmarks/dreambooth_step.py").main,
            ["--base", str(evil)],
        ),
        "benchmarks/subject_fidelity.py --run": (
            load_script("benchmarks/subject_fidelity.py").main,
            ["--run", str(run)],
        ),
    }


def test_every_entry_point_refuses_a_poisoned_config_in_one_line(tmp_path, victim, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    evil = poisoned_checkpoint(
        tmp_path / "evil.ckpt", payloads(marker, victim)["pathlib.Path.write_text (nested)"]
    )
    for name, (main, argv) in entry_points(evil, tmp_path).items():
        with pytest.raises(SystemExit) as stop:
            run_main(main, argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 1 and len(lines) == 1, (name, lines)
        assert (
            lines[0].startswith("error: ")
            and f"{evil}: refusing to build its config: model_config.unet._target_" in lines[0]
        ), name
        assert not marker.exists(), name
    assert (victim / "keep.txt").is_file()


def test_train_refuses_a_poisoned_base_in_one_line(tmp_path, victim, caplog):
    marker = tmp_path / "pwned"
    evil = poisoned_checkpoint(tmp_path / "evil.ckpt", payloads(marker, victim)["builtins.open"])
    cfg = compose_train(
        tmp_path,
        [
            "experiment=lora_finetune",
            "debug=smoke",
            "logger=none",
            f"model.base={evil}",
            "data.cache_dir=null",
            "callbacks.rich_progress_bar=null",
            "callbacks.lr_monitor=null",
        ],
        output_name="ft",
    )
    with pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert stop.value.code == 1 and len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(
        f"error: {evil}: refusing to build its config: model_config._target_ names 'builtins.open'"
    )
    assert not marker.exists()
