"""Every command in README.md, as a user types it, shortened: a README command that breaks fails CI.

The earlier runs commands build on are made once per session (``prior_runs``): ``bash
scripts/embedded_chain.sh`` (shortened through its *_ARGS variables: VAE, txt2img, LoRA, fidelity, samples),
then the README's ``experiment=textual_inversion`` / ``hypernetwork`` / ``dreambooth`` runs in-process, the
shards, a converted single file and the image / Hugging Face folders a user would point at. Each command then
runs in its own folder holding hard-linked copies of those: ``train.py`` in-process with ``debug=smoke`` and
tiny parts (chosen from what its composed config has), ``-m`` sweeps in a forked process, ``sample.py`` /
``benchmarks`` / ``scripts`` through their ``main(argv)`` with few steps. Commands that need a GPU or the
user's own files (real SD weights) are composed (``train.py``: config and trainer built, strategy included) or
argument-parsed; the few that cannot run at all are listed with the reason in ``tests/readme_commands.py``
(NOT_RUN, COMPOSE_ONLY).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose_train, hard_linked_copy, load_script, shared_once
from tests.forked_cli import run_train_forked
from tests.metric_models import save_clip, save_dino
from tests.readme_commands import SHORT, Command, env, readme_commands, tiny_for

COMMANDS = readme_commands()
CHAIN = "bash scripts/embedded_chain.sh"
# train.py commands that prior_runs runs (the test checks what they left).
PRIOR = {
    f"python train.py experiment={name}": name for name in ("textual_inversion", "hypernetwork", "dreambooth")
}
# Run elsewhere in the suite (spawning processes from inside pytest is what those tests do, once).
COVERED_ELSEWHERE = {
    "trainer=ddp_sim": "composed here; run (2 CPU processes) by "
    "test_train.py::test_ddp_sim_runs_two_cpu_processes (and with trainer.strategy=ddp_fork by "
    "test_ddp_fork_hands_the_weights_back_and_summarises_the_workers_steps)",
}
# Warnings a README command may print, each on purpose (substring of the message -> why).
EXPECTED_WARNINGS = {}
# Folders and files a user has, as the README names them -> what prior_runs made (longest names first).
USER_PATHS = {
    "/data/photos_shards": "photos_shards",
    "/path/to/images": "images",
    "/data/photos": "images",
    "/data/train": "images",
    "/data/dog": "images",
    "/data/hf_set": "hf_set",
    "in.png": "images/0.png",
    "model.safetensors": "model.safetensors",
    "my-star.safetensors": "my-star.safetensors",
    "other.pt": "other.pt",
}


def newest(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert found, f"no {pattern} under {root}: add the run that makes it to prior_runs"
    return found[-1]


def train_in_process(overrides: list[str], work: Path) -> dict:
    """``python train.py <overrides>`` shortened, in this process, writing under ``work``."""
    from ldm.utils.quiet import quiet_known_noise
    from ldm.utils.task import close_wandb
    from train import train

    debug = [] if any(o.startswith("debug=") for o in overrides) else ["debug=smoke"]
    full = [*overrides, *tiny_for(overrides, work), *debug, f"paths.root_dir={work}"]
    if any(o.startswith("ckpt_path=") for o in overrides):  # resume the chain's 4-step run for 2 more steps
        full += ["trainer.max_steps=6", "trainer.max_epochs=-1"]
    cfg = compose_train(work, full, output_name=f"run_{len(list(work.glob('logs/*/runs/*'))):03d}")
    with warnings.catch_warnings(record=True) as caught:  # the console a user sees: train.py's filters only
        warnings.simplefilter("always")
        quiet_known_noise()
        try:
            _, objects = train(cfg)
        finally:
            # as train.py's run_task does: the next in-process run must not reuse this wandb run
            close_wandb()
    noise = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if not any(allowed in str(w.message) for allowed in EXPECTED_WARNINGS)
    ]
    assert not noise, f"python train.py {' '.join(overrides)} prints warnings:\n" + "\n".join(noise)
    trainer = objects["trainer"]
    (Path(cfg.paths.output_dir) / ".hydra").mkdir(parents=True, exist_ok=True)  # as Hydra's run folder has it
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")
    if not trainer.fast_dev_run and cfg.get("train", True):
        assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
    return objects


def make_user_files(root: Path) -> None:
    """An image folder with captions, a Hugging Face dataset, a single file, embeddings and shards."""
    import datasets

    from ldm.io.embeddings import load_embedding

    images = root / "images"
    images.mkdir()
    pictures = [Image.new("RGB", (72, 64), (40 * i, 200 - 30 * i, 90)) for i in range(6)]
    for i, picture in enumerate(pictures):
        picture.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a picture number {i}")
    datasets.Dataset.from_dict({"image": pictures, "text": [f"row {i}" for i in range(6)]}).save_to_disk(
        str(root / "hf_set")
    )
    txt2img = newest(root, "logs/txt2img/runs/*/checkpoints/last.ckpt")
    load_script("scripts/convert.py").main(["--base", str(txt2img), "--out", str(root / "model.safetensors")])
    embedding = newest(root, "logs/textual_inversion/runs/*/adapters/*.safetensors")
    shutil.copy(embedding, root / "my-star.safetensors")  # triggered by its file name, as in AUTOMATIC1111
    vectors = load_embedding(embedding).vectors  # an AUTOMATIC1111 .pt, as their webui writes it
    torch.save({"string_to_param": {"*": vectors.flip(0)}, "name": "other"}, root / "other.pt")
    save_clip(root / "metric_models" / "clip")  # tiny CLIP / DINO folders for scripts/evaluate.py
    save_dino(root / "metric_models" / "dino")
    load_script("scripts/make_shards.py").main(
        [
            "--shapes",
            "--train-size",
            "8",
            "--val-size",
            "2",
            "--resolution",
            "32",
            "--out",
            str(root / "data" / "shapes_shards"),
        ]
    )


@pytest.fixture(scope="session")
def prior_runs(embedded_chain: Path, tmp_path_factory) -> Path:
    """The chain's runs, then the README's textual-inversion, hypernetwork and DreamBooth runs on its txt2img
    model, and the files users point commands at (once per session, shared by pytest-xdist workers)."""

    def build(folder: Path) -> None:
        hard_linked_copy(embedded_chain, folder)
        cwd = Path.cwd()
        os.chdir(folder)
        try:
            for name in PRIOR.values():
                train_in_process([f"experiment={name}"], folder)
            make_user_files(folder)
        finally:
            os.chdir(cwd)

    return shared_once(tmp_path_factory, "prior_runs", build)


def _placeholder(flag: str, work: Path) -> str:
    """What ``<file>``, ``<run>``, ``...`` stand for after ``flag``."""
    patterns = {
        "--ckpt": "logs/txt2img/runs/*/checkpoints/last.ckpt",
        "--base": "logs/txt2img/runs/*/checkpoints/last.ckpt",
        "--run": "logs/dreambooth/runs/*",
        "--lora": "logs/lora_finetune/runs/*/adapters/*.safetensors",
        "--embedding": "logs/textual_inversion/runs/*/adapters/*.safetensors",
        "--hypernetwork": "logs/hypernetwork/runs/*/adapters/*.pt",
        "--clip": "metric_models/clip",
        "--dino": "metric_models/dino",
        "model.vae_ckpt": "logs/vae/runs/*/checkpoints/last.ckpt",
    }
    assert flag in patterns, f"README placeholder after {flag!r}: tell test_readme.py what it stands for"
    return str(newest(work, patterns[flag]))


def fill(argv: list[str], work: Path, runs_needed: bool = True) -> list[str]:
    """Placeholders -> files of the copied runs: ``logs/<task>/runs/<run>``, ``<file>``, user folders, LoRA
    files (``runs_needed=False``: a command only parsed may name runs of real models, e.g.
    ``logs/lora_sd15``)."""
    out = []
    for i, arg in enumerate(argv):
        flag = argv[i - 1] if i else ""
        for task in re.findall(r"logs/(\w+)/runs/<run>", arg):
            if runs_needed or (work / "logs" / task).is_dir():
                arg = arg.replace(f"logs/{task}/runs/<run>", str(newest(work, f"logs/{task}/runs/*")))
        for user, ours in USER_PATHS.items():
            arg = re.sub(rf"(?<![\w/.]){re.escape(user)}", str(work / ours), arg)
        if arg.startswith("model.vae_ckpt=..."):
            arg = f"model.vae_ckpt={_placeholder('model.vae_ckpt', work)}"
        if flag.startswith("--") and re.fullmatch(r"<[^>]+>|\.\.\.", arg) and "prompt" not in flag:
            arg = _placeholder(flag, work)
        if flag == "--lora":
            path, _, scale = arg.partition(":")
            if not Path(path).exists():  # a.safetensors, kohya_style.safetensors, ...: the chain's LoRA
                arg = f"{_placeholder('--lora', work)}:{scale}" if scale else _placeholder("--lora", work)
        out.append(arg)
    return out


def compose_and_build(overrides: list[str], work: Path) -> None:
    """What a machine without a GPU / the user's files can check: the config composes and resolves, the
    trainer's strategy object builds."""
    cfg = compose_train(work, overrides)
    assert not OmegaConf.missing_keys(cfg), f"the command leaves {sorted(OmegaConf.missing_keys(cfg))} unset"
    OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, dict) or OmegaConf.is_dict(strategy):
        hydra.utils.instantiate(strategy)


def run_train(cmd: Command, work: Path, compose_only: bool) -> None:
    overrides = fill(cmd.argv[cmd.argv.index("train.py") + 1 :], work, runs_needed=not compose_only)
    if compose_only:
        compose_and_build(overrides, work)
        return
    if "-m" in overrides:  # a sweep: through Hydra's launcher, as typed
        full = [*overrides, *tiny_for(overrides, work), "debug=smoke"]
        result = run_train_forked(
            [
                *full,
                f"paths.log_dir={work / 'logs'}",
                f"paths.root_dir={work}",
                "callbacks.rich_progress_bar=null",
            ],
            env=env(),
            cwd=work,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        values = re.findall(r"optimized_metric (\S+) = (\S+)", result.stdout + result.stderr)
        assert len(values) == sum(o.count(",") for o in overrides if "=" in o) + 1, values
        return
    train_in_process(overrides, work)


def run_script(cmd: Command, work: Path, parse_only: bool) -> None:
    program = cmd.program
    argv = fill(cmd.argv[cmd.argv.index(program) + 1 :], work, runs_needed=not parse_only)
    short = SHORT.get(program, [])
    if program == "sample.py":
        sample = load_script("sample.py")
        if parse_only:
            sample.parse_args(argv)
            return
        assert sample.main([*argv, *short, "--out", str(work / "samples")]).is_file()
    elif program == "scripts/convert.py":
        assert Path(load_script(program).main(argv)).is_file()
    elif program == "scripts/lora_tools.py":
        assert load_script(program).main(argv)["modules"] > 0
    elif program == "scripts/clear_cache.py":
        entry = Path(os.environ.get("LDM_ROOT", ".")) / ".cache" / "latents" / "latents_0123.pt"
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(b"latents")
        assert load_script(program).main(argv)[str(entry.parent)] == len(b"latents") and not entry.exists()
    elif program == "scripts/make_shards.py":
        out = Path(argv[argv.index("--out") + 1])
        load_script(program).main([*argv, *short])
        assert (out / "index.json").is_file()
    elif program == "benchmarks/fidelity.py":
        results = load_script(program).main([*argv, *short])
        assert results and all(0.0 <= r["fidelity"] <= 1.0 for r in results.values())
    elif program == "benchmarks/compile_step.py":
        rows = load_script(program).main([*argv, *short])
        assert rows and all(r["eager_s"] > 0 and r["compiled_s"] > 0 for r in rows)
    elif program == "benchmarks/unet_step.py":
        assert load_script(program).main([*argv, *short])["ours"]["median_s"] > 0
    elif program == "benchmarks/subject_fidelity.py":
        results = load_script(program).main([*argv, *short])
        assert results and all(
            0.0 <= v <= 1.0 for r in results.values() for v in r.values() if isinstance(v, float)
        )
    elif program == "benchmarks/clip_retrieval.py":
        results = load_script(program).main([*argv, *short])
        assert set(results) == {"val", "heldout"} and all(0 <= r["top1"] <= 1 for r in results.values())
    elif program == "scripts/evaluate.py":
        evaluate = load_script(program)
        if parse_only:
            evaluate.parse_args(argv)
            return
        results = evaluate.main([*argv, *short])
        assert results and all(
            -1 <= v <= 1 for row in results.values() for k, v in row.items() if k != "samples"
        )
    elif program == "benchmarks/dreambooth_step.py":
        tiny = [
            "data.concepts.0.num_class_images=2",
            "data.class_images.steps=2",
            "data.cache_dir=null",
            f"data.class_images.cache_dir={work / 'cache'}",
            "model/sampler=ddim",
            "model.sampler.steps=2",
        ]
        results = load_script(program).main([*argv, *short, *[f"--override={o}" for o in tiny]])
        assert all(r["step_s"] > 0 for r in results.values()) and set(results) == {"full", "lora"}
    elif program == "benchmarks/sampling.py":
        out = load_script(program).main([*argv, *short])
        assert out and all(out.values())
    else:
        raise AssertionError(
            f"README command {cmd.text!r}: no runner for {program!r}; add one to "
            "tests/test_readme.py or list it in tests/readme_commands.py NOT_RUN with the reason"
        )


def check_prior(cmd: Command, prior: Path) -> None:
    """A command prior_runs ran: it left a run with a checkpoint and its exported adapter."""
    run = newest(prior, f"logs/{PRIOR[cmd.text]}/runs/*")
    assert (run / "checkpoints" / "last.ckpt").is_file() and any((run / "adapters").iterdir())


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.text[:90] for c in COMMANDS])
def test_readme_command(cmd: Command, prior_runs: Path, tmp_path: Path, monkeypatch):
    if cmd.not_run_reason:
        return  # listed in NOT_RUN, with its reason
    if cmd.text.startswith(CHAIN):
        docs = prior_runs / "docs"
        assert list((docs / "fidelity").glob("*.png")) and (docs / "lora_after" / "grid.png").is_file()
        return
    if cmd.text in PRIOR:
        check_prior(cmd, prior_runs)
        return
    work = hard_linked_copy(prior_runs, tmp_path)
    monkeypatch.chdir(work)  # relative paths in the command (logs/..., ours.safetensors) land here
    offline = cmd.needs_gpu or cmd.needs_user_files or cmd.compose_only_reason is not None
    if cmd.program == "train.py":
        elsewhere = any(key in cmd.text for key in COVERED_ELSEWHERE)
        run_train(cmd, work, compose_only=offline or elsewhere)
    elif offline and cmd.program == "benchmarks/data_loading.py":
        load_script(cmd.program).parse_args(cmd.argv[2:])
    else:
        parsable = ("sample.py", "scripts/evaluate.py")
        assert not (offline and cmd.program not in parsable), f"{cmd.text!r}: needs a GPU or user files"
        run_script(cmd, work, parse_only=offline)


def test_readme_has_the_commands_this_test_expects():
    """The parser still finds the README's commands (a reformatted README must not silently drop them)."""
    texts = [c.text for c in COMMANDS]
    assert "python train.py experiment=vae" in texts and CHAIN in texts and set(PRIOR) <= set(texts)
    assert any(t.startswith("python sample.py --ckpt last") for t in texts)
    assert any("-m experiment=vae" in t for t in texts)
    assert "python train.py experiment=lora_finetune model.ema_decay=0.999 model.ema_device=cpu" in texts
    assert not any("weights_only=True" in t for t in texts)  # a guarantee table's words, not a command
    assert len(texts) >= 70


def test_lora_step_variant():
    """``benchmarks/lora_step.py``'s measuring code (the README runs it per variant in fresh processes)."""
    lora_step = load_script("benchmarks/lora_step.py")
    full = lora_step.run_variant("full", "embedded", 32, 1, 1, "cpu")
    lora = lora_step.run_variant("lora", "embedded", 32, 1, 1, "cpu")
    assert 0 < lora["trainable"] < 0.2 * full["trainable"] and lora["median_s"] > 0


def test_scripts_run_by_readme_tests_use_the_running_interpreter():
    """``python`` inside scripts/embedded_chain.sh is the interpreter running pytest (a venv that was not
    activated included), not whatever ``python`` comes first on the user's PATH."""
    from tests.readme_commands import env

    found = shutil.which("python", path=env()["PATH"])
    assert found is not None and Path(found).parent == Path(sys.executable).parent
