"""Scale-out and memory recipes: the SLURM script's and the torchrun recipe's overrides compose into a
multi-node DDP trainer; benchmarks/memory.py measures every saver (tiny UNet here)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

from hydra.utils import instantiate

from tests.conftest import ROOT, load_script


def srun_overrides() -> list[str]:
    script = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    line = re.search(r"srun python train\.py (.+?)\"\$@\"", script, re.DOTALL).group(1)
    values = {"$SLURM_NNODES": "2", "$SLURM_NTASKS_PER_NODE": "4", "$SLURM_JOB_ID": "123", "\\$": "$"}
    for key, value in values.items():
        line = line.replace(key, value)
    return shlex.split(line.replace("\\\n", " "))


def test_slurm_and_torchrun_recipes_compose_a_multi_node_ddp_trainer(compose_cfg):
    overrides = srun_overrides()
    assert "trainer=ddp" in overrides and "trainer.num_nodes=2" in overrides
    cfg = compose_cfg(["experiment=txt2img", *[o for o in overrides if not o.startswith("hydra.")]])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4 and cfg.trainer.strategy == "ddp"
    assert cfg.trainer.accelerator == "gpu"
    readme = (ROOT / "docs" / "scale.md").read_text()
    torchrun = re.search(r"torchrun .*? train\.py (.+)", readme).group(1).split()
    cfg = compose_cfg(["experiment=lora_finetune", *torchrun])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"


def test_ddp_strategy_builds_for_two_nodes(compose_cfg):
    cfg = compose_cfg(["experiment=txt2img", "trainer=ddp_sim", "trainer.num_nodes=2"])
    trainer_cfg = {**cfg.trainer, "logger": False, "enable_checkpointing": False}
    from lightning.pytorch.strategies import DDPStrategy

    trainer = instantiate(trainer_cfg, callbacks=None)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_nodes == 2 and trainer.world_size == 4


def test_memory_benchmark_runs_every_saver(tmp_path):
    """Every variant's step runs (in this process, tiny); the script measures each in its own process and
    writes the table (one variant here: each child is a fresh interpreter, ~8 s of imports)."""
    memory = load_script("benchmarks/memory.py")
    rows = [memory.run_variant(variant, "tiny", 32, 1, 1, "cpu") for variant in memory.VARIANTS]
    assert [r["variant"] for r in rows] == [
        "full",
        "+ckpt",
        "+adafactor",
        "+in_backward",
        "+bf16",
        "+bf16_weights",
        "lora",
        "lora_bf16",
    ]
    assert rows[-2]["trainable_m"] == rows[-1]["trainable_m"] < rows[0]["trainable_m"]

    out = tmp_path / "memory.json"
    cmd = [
        sys.executable,
        "benchmarks/memory.py",
        "--unet",
        "tiny",
        "--resolution",
        "32",
        "--steps",
        "1",
        "--variants",
        "full",
        "--json",
        str(out),
    ]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["full"] and rows[0]["peak_gib"] > 0
    assert "| full |" in result.stdout and "1.00x" in result.stdout


def test_fsdp_config_wraps_and_checkpoints_the_unet_blocks(compose_cfg):
    from lightning.pytorch.strategies import FSDPStrategy

    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.unet import ResBlock

    cfg = compose_cfg(["experiment=txt2img", "trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {ResBlock, BasicTransformerBlock} <= set(policy._module_classes)
    assert strategy._activation_checkpointing_kwargs
