"""Every command in README.md, as a user types it, shortened: a README command that breaks fails CI.

``bash scripts/embedded_chain.sh`` runs first (shortened through its *_ARGS variables): its VAE, txt2img and
LoRA runs are the earlier runs the other commands build on (``ckpt_path=last``, ``--ckpt last``,
``logs/<task>/runs/<run>/...``). Each command then runs in its own folder holding a copy of those runs:
``train.py`` in-process with ``debug=smoke`` and tiny parts (chosen from what its composed config has),
``-m`` sweeps and the shell script as subprocesses, ``sample.py`` / ``benchmarks`` / ``scripts`` through their
``main(argv)`` with few steps. Commands that need a GPU or the user's own files (real SD weights) are
composed (``train.py``) or argument-parsed; the few that cannot run at all are listed with the reason in
``tests/readme_commands.py`` (NOT_RUN).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import ROOT, compose_train
from tests.readme_commands import IMAGE_FOLDER, SHORT, Command, env, readme_commands, tiny_for

COMMANDS = readme_commands()
CHAIN = "bash scripts/embedded_chain.sh"
# Run elsewhere in the suite (spawning processes from inside pytest is what those tests do, once).
COVERED_ELSEWHERE = {
    "trainer=ddp_sim": "composed here; run (2 CPU processes) by test_train.py::test_ddp_sim_runs_two_cpu_processes",
}


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_readme", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workspace(chain: Path, tmp_path: Path) -> Path:
    """A folder with a copy of the chain's runs under logs/ and an image folder for /path/to/images."""
    shutil.copytree(chain / "logs", tmp_path / "logs")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (72, 64), (40 * i, 200 - 30 * i, 90)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a picture number {i}")
    return tmp_path


def fill(argv: list[str], work: Path) -> list[str]:
    """Placeholders -> files of the copied runs: ``logs/<task>/runs/<run>``, /path/to/images, LoRA files."""
    lora = sorted((work / "logs").glob("lora_finetune/runs/*/adapters/*.safetensors"))
    out = []
    for i, arg in enumerate(argv):
        for task in re.findall(r"logs/(\w+)/runs/<run>", arg):
            runs = sorted((work / "logs" / task / "runs").iterdir())
            assert runs, f"{arg}: no earlier {task} run; add it to scripts/embedded_chain.sh or this test"
            arg = arg.replace(f"logs/{task}/runs/<run>", str(runs[-1]))
        arg = arg.replace(IMAGE_FOLDER, str(work / "images"))
        if i > 0 and argv[i - 1] == "--lora":
            path, _, scale = arg.partition(":")
            if not (work / path).exists():
                arg = f"{lora[-1]}:{scale}" if scale else str(lora[-1])
        out.append(arg)
    return out


def run_train(cmd: Command, work: Path, compose_only: bool) -> None:
    overrides = fill(cmd.argv[cmd.argv.index("train.py") + 1:], work)
    if compose_only:
        cfg = compose_train(work, overrides)
        OmegaConf.to_container(cfg.trainer, resolve=True)
        return
    debug = [] if any(o.startswith("debug=") for o in overrides) else ["debug=smoke"]
    full = [*overrides, *tiny_for(overrides, work), *debug]
    if any(o.startswith("ckpt_path=") for o in overrides):  # resume the chain's 4-step run for 2 more steps
        full += ["trainer.max_steps=6", "trainer.max_epochs=-1"]
    if "-m" in overrides:  # a sweep: through Hydra's launcher, as typed
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *full, f"paths.log_dir={work / 'logs'}",
                                 "callbacks.rich_progress_bar=null"], cwd=work, env=env(), capture_output=True,
                                text=True, timeout=300, check=False)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        values = re.findall(r"optimized_metric (\S+) = (\S+)", result.stdout + result.stderr)
        assert len(values) == sum(o.count(",") for o in overrides if "=" in o) + 1, values
        return
    from ldm.utils.task import close_wandb
    from train import train

    cfg = compose_train(work, full)
    try:
        _, objects = train(cfg)
    finally:
        close_wandb()  # as train.py's run_task does: the next in-process run must not reuse this wandb run
    trainer = objects["trainer"]
    if not trainer.fast_dev_run and cfg.get("train", True):
        assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def run_script(cmd: Command, work: Path, parse_only: bool) -> None:
    program = cmd.program
    argv = fill(cmd.argv[cmd.argv.index(program) + 1:], work)
    if program == "sample.py":
        sample = load_script("sample.py")
        if parse_only:
            sample.parse_args(argv)
            return
        assert sample.main([*argv, *SHORT["sample.py"], "--out", str(work / "samples")]).is_file()
    elif program == "scripts/convert.py":
        out = load_script("scripts/convert.py").main(argv)
        assert Path(out).is_file()
    elif program == "benchmarks/fidelity.py":
        results = load_script(program).main([*argv, *SHORT[program]])
        assert results and all(0.0 <= r["fidelity"] <= 1.0 for r in results.values())
    elif program == "benchmarks/unet_step.py":
        results = load_script(program).main([*argv, *SHORT[program]])
        assert results["ours"]["median_s"] > 0
    else:
        raise AssertionError(f"README command {cmd.text!r}: no runner for {program!r}; add one to "
                             "tests/test_readme.py or list it in tests/readme_commands.py NOT_RUN with the reason")


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.text[:90] for c in COMMANDS])
def test_readme_command(cmd: Command, embedded_chain: Path, tmp_path: Path, monkeypatch):
    chain = embedded_chain
    if cmd.not_run_reason:
        return  # listed in NOT_RUN, with its reason
    if cmd.text.startswith(CHAIN):
        docs = chain / "docs"
        assert list((docs / "fidelity").glob("*.png")) and (docs / "lora_after" / "grid.png").is_file()
        return
    work = workspace(chain, tmp_path)
    monkeypatch.chdir(work)  # relative paths in the command (logs/..., ours.safetensors) land here
    offline = cmd.needs_gpu or cmd.needs_user_files
    if cmd.program == "train.py":
        elsewhere = any(key in cmd.text for key in COVERED_ELSEWHERE)
        run_train(cmd, work, compose_only=offline or elsewhere)
    else:
        assert not (offline and cmd.program != "sample.py"), f"{cmd.text!r}: needs a GPU or user files"
        run_script(cmd, work, parse_only=offline)


def test_readme_has_the_commands_this_test_expects():
    """The parser still finds the README's commands (a reformatted README must not silently drop them)."""
    texts = [c.text for c in COMMANDS]
    assert "python train.py experiment=vae" in texts and CHAIN in texts
    assert any(t.startswith("python sample.py --ckpt last") for t in texts)
    assert any("-m experiment=vae" in t for t in texts)
    assert len(texts) >= 30


def test_lora_step_variant():
    """``benchmarks/lora_step.py``'s measuring code (the README runs it per variant in fresh processes)."""
    lora_step = load_script("benchmarks/lora_step.py")
    full = lora_step.run_variant("full", "embedded", 32, 1, 1, "cpu")
    lora = lora_step.run_variant("lora", "embedded", 32, 1, 1, "cpu")
    assert 0 < lora["trainable"] < 0.2 * full["trainable"] and lora["median_s"] > 0
