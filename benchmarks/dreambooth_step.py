"""DreamBooth with the full UNet vs DreamBooth-LoRA: time and peak memory per training step.

Each variant composes its experiment (``experiment=dreambooth`` / ``experiment=dreambooth_lora``) exactly as
``train.py`` would, with the same base, data (instance + class images, latents cached) and batch, and runs
``--steps`` optimiser steps in its own process, so the peak resident memory (ru_maxrss; on a GPU
torch.cuda.max_memory_allocated) is its own. Step time: median over the steps after ``--warmup``.

    python benchmarks/dreambooth_step.py --base logs/txt2img/runs/<run>/checkpoints/last.ckpt
    python benchmarks/dreambooth_step.py --base <ckpt> --batch 8 --steps 30 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.threads import thread_env

os.environ.update(thread_env())  # before torch loads OpenMP (docs/scale.md: Threads)

from ldm.utils.data_handover import connect_data
from ldm.utils.task import child_failure, run_main

VARIANTS = {"full": "dreambooth", "lora": "dreambooth_lora"}


def compose(experiment: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = hydra_compose("train.yaml", overrides=[f"experiment={experiment}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="dreambooth_step_")
    return cfg


def run_variant(
    variant: str, base: str, batch: int, steps: int, warmup: int, device: str, extra: list[str]
) -> dict:
    import hydra
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *args):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    cfg = compose(VARIANTS[variant], [f"model.base={base}", f"data.batch_size={batch}", *extra])
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    # class images and latent cache from the model's services, as train.py does
    connect_data(model, datamodule)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
        default_root_dir=cfg.paths.output_dir,
    )
    trainer.fit(model, datamodule=datamodule)
    trainable = sum(p.numel() for p in model.method.parameters())
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "variant": variant,
        "step_s": statistics.median(timer.times[warmup:]),
        "peak_gib": peak,
        "trainable_params": trainable,
        "steps": len(timer.times),
    }


def run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--base",
        args.base,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        *[f"--override={o}" for o in args.override],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise child_failure(variant, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base model (model.base)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run both variants in this process (quicker; peak memory is then not per variant)",
    )
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one variant, in a child
    args = p.parse_args(argv)
    measure = (args.base, args.batch, args.steps, args.warmup, args.device, args.override)
    if args.variant:
        print(json.dumps(run_variant(args.variant, *measure)))
        return {}
    results = {}
    for variant in VARIANTS:
        results[variant] = run_variant(variant, *measure) if args.in_process else run_child(variant, args)
        r = results[variant]
        print(
            f"{variant:5s} {r['step_s'] * 1000:8.1f} ms/step  peak {r['peak_gib']:.2f} GiB  "
            f"{r['trainable_params'] / 1e6:.2f} M trainable",
            flush=True,
        )
    full, lora = results["full"], results["lora"]
    print(f"\n| DreamBooth, batch {args.batch} | step time | peak memory | trainable parameters |")
    print("|---|---|---|---|")
    for name, r in (("full UNet", full), ("LoRA", lora)):
        print(
            f"| {name} | {r['step_s'] * 1000:.0f} ms | {r['peak_gib']:.2f} GiB | "
            f"{r['trainable_params'] / 1e6:.2f} M |"
        )
    print(
        f"| LoRA / full | {lora['step_s'] / full['step_s']:.2f} | {lora['peak_gib'] / full['peak_gib']:.2f} "
        "| |"
    )
    return results


if __name__ == "__main__":
    run_main(main)
