"""Shared fixtures: compose ``conf/train.yaml`` for tests, offline, into a temporary directory."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ldm.utils.threads import available_cores, thread_env

# Before torch loads OpenMP (it reads these once): the cores split between pytest-xdist's workers; one
# process (-n 0) takes one thread too: at the tests' tiny sizes thread start-up and sync cost more than they
# bring, and a fixed count keeps the exact-resume tests bit-exact (nothing adapts to the load). Yours
# (OMP_NUM_THREADS, OMP_WAIT_POLICY) win; subprocesses inherit.
os.environ.update(thread_env(processes=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or available_cores())))

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ldm.utils.runs import register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

register_resolvers()

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Runnable experiments; conf/experiment/_*.yaml are the blocks they inherit (_finetune_shapes,
# _finetune_sd15).
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


@functools.lru_cache(maxsize=1)
def captioned_image_folder() -> Path:
    """Six 40x40 PNGs with sidecar captions, made once per session (for ``data.source.root=...``)."""
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="ldm-test-images-"))
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 200 - 30 * i, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red star number {i}")
    return folder


@pytest.fixture(scope="module")
def sd_schedule():
    """Stable Diffusion's schedule (scaled linear, 1,000 steps), for the sampler tests."""
    from ldm.diffusion import DiffusionSchedule

    return DiffusionSchedule.from_config("scaled_linear", num_timesteps=1000)


@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory):
    """A tiny CLIP text encoder (offline tokenizer), built once per module; ``te``: a fresh copy per test."""
    from ldm.modules.text_encoder import CLIPTextEncoder

    return CLIPTextEncoder.tiny(cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture
def te(tiny_te):
    import copy

    return copy.deepcopy(tiny_te)


def load_script(relative: str):
    """A script of the project (``sample.py``, ``benchmarks/memory.py``) as a module, to call its
    functions."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_script", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_training_callback(monkeypatch, callback) -> None:
    """Append ``callback`` to the callbacks ``train()`` instantiates from the config (for the rest of the
    test)."""
    import train as train_module

    original = train_module.instantiate_callbacks
    monkeypatch.setattr(train_module, "instantiate_callbacks", lambda cfg: [*original(cfg), callback])


def compose_train(tmp_path: Path, overrides: list[str], output_name: str = "run") -> DictConfig:
    """The config ``python train.py <overrides>`` would build, writing under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "logs" / cfg.task_name / "runs" / output_name)
        cfg.extras.print_config = False
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(overrides: list[str], output_name: str = "run") -> DictConfig:
        return compose_train(tmp_path, overrides, output_name)

    return _compose


def shared_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` once per test session, also under pytest-xdist: the first worker to ask builds it
    (the others wait on a file lock) and every worker reads the same folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own basetemp under a common parent
        root = root.parent
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


def hard_linked_copy(source: Path, target: Path) -> Path:
    """A copy of ``source``'s files under ``target`` that costs no disk (new runs write new files only)."""
    for item in source.iterdir():
        if item.is_dir():
            shutil.copytree(item, target / item.name, copy_function=os.link)
        elif item.name != ".complete":
            os.link(item, target / item.name)
    return target


@pytest.fixture(scope="session")
def embedded_chain(tmp_path_factory) -> Path:
    """``bash scripts/embedded_chain.sh`` shortened (tiny VAE -> CLIP -> txt2img -> LoRA + fidelity +
    samples), once per session: ``<root>/logs/{vae,clip,txt2img,lora_finetune}/runs/*`` and ``<root>/docs``.
    Read-only: tests that add runs work on a ``hard_linked_copy``."""
    from tests.readme_commands import run_embedded_chain

    return shared_once(tmp_path_factory, "chain", run_embedded_chain)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests on the shared embedded chain first: its one-off build (~40 s) then overlaps with the rest of the
    suite on the other pytest-xdist workers instead of ending up last."""
    items.sort(key=lambda item: not {"embedded_chain", "prior_runs"} & set(getattr(item, "fixturenames", ())))
