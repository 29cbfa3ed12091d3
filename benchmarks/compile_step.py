"""Compiled vs eager training steps (``model.compile``) of the embedded VAE, the embedded UNet and the SD 1.5
UNet, with compile time and the steps after which compiling pays back.

Each workload is one fp32 training step (forward, loss, backward, Adam) of the network as its experiment
trains it: ``vae`` = the f=4 VAE of ``experiment=vae`` (batch 32 of 32 px), ``unet`` = the small UNet of
``experiment=txt2img`` (batch 32 of 8x8x4 latents, 20x64 text context), ``sd15`` = the SD v1.5 UNet (batch 1
of 32x32x4 latents, 77x768 context). The compiled twin is a copy compiled in place exactly as
``model.compile=<mode>`` does (``ldm/modules/compile.py``); eager and compiled steps alternate so both see
the same machine. Compile time = the compiled twin's first step minus its median step; pay-back = compile
time / (eager - compiled median); "net over budget" = what compiling saves (or costs, negative) over the
step budget of the workload's experiment.

    python benchmarks/compile_step.py                          # vae and unet, blocks
    python benchmarks/compile_step.py --workloads sd15 --mode whole
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.threads import thread_env

os.environ.update(thread_env())  # before torch loads OpenMP (docs/scale.md: Threads)

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.modules.compile import compile_in_place
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from ldm.utils.task import run_main

# the step budget of the experiment each workload belongs to (conf/experiment/*.yaml trainer.max_steps)
BUDGETS = {"vae": 2200, "unet": 2900, "sd15": None}


def preset(group: str, name: str, **values) -> dict:
    cfg = OmegaConf.load(ROOT / "conf/model" / group / f"{name}.yaml")
    cfg = OmegaConf.to_container(OmegaConf.merge(cfg, values), resolve=False)
    cfg.pop("_target_")
    return cfg


def workload(name: str, batch: int | None):
    """(network, a function network -> loss) of one workload, fixed inputs."""
    g = torch.Generator().manual_seed(0)
    if name == "vae":
        net = AutoencoderKL(**preset("vae", "f4", resolution=32))
        x = torch.rand(batch or 32, 3, 32, 32, generator=g) * 2 - 1

        def loss(model):
            torch.manual_seed(0)  # the posterior sample: the same draws eager and compiled (fallback_random)
            rec, posterior = model(x)
            return (rec - x).abs().mean() + 1e-6 * posterior.kl().mean()

        return net, loss
    config, size, length, default_batch = {"unet": ("small", 8, 20, 32), "sd15": ("sd15", 32, 77, 1)}[name]
    kwargs = preset("unet", config)
    net = UNetModel(**kwargs)
    b = batch or default_batch
    z = torch.randn(b, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, length, kwargs["context_dim"], generator=g)
    target = torch.randn(b, 4, size, size, generator=g)
    return net, lambda model: F.mse_loss(model(z, t, context), target)


def make_step(model, loss_of):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_of(model).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    net, loss_of = workload(name, args.batch)
    net.train()
    twin = copy.deepcopy(net)
    count = compile_in_place(twin, args.mode, args.backend)
    eager, compiled = make_step(net, loss_of), make_step(twin, loss_of)
    eager()  # eager warm-up
    first = compiled()  # compiles (forward and backward)
    times = {"eager": [], "compiled": []}
    for i in range(args.steps):
        order = [("eager", eager), ("compiled", compiled)]
        for key, step in order if i % 2 == 0 else order[::-1]:
            times[key].append(step())
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    cost = max(0.0, first - c)
    budget = BUDGETS[name]
    row = {"workload": name, "modules": count, "eager_s": e, "compiled_s": c, "compile_s": cost}
    row["payback_steps"] = cost / (e - c) if e > c else None
    row["net_over_budget_s"] = budget * (e - c) - cost if budget else None
    print(
        f"{name}: eager {e:.3f} s/step, compiled ({args.mode}, {count} modules) {c:.3f} s/step, "
        f"compile {cost:.1f} s",
        flush=True,
    )
    return row


def table(rows: list[dict], args) -> str:
    header = (
        f"\nmode={args.mode} backend={args.backend} threads={torch.get_num_threads()} steps={args.steps} "
        f"loadavg={os.getloadavg()[0]:.1f}\n"
    )
    columns = "workload | eager s/step | compiled s/step | speed-up | compile s | pay-back steps | budget"
    lines = [header, f"| {columns} | net over budget |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        payback = f"{r['payback_steps']:,.0f}" if r["payback_steps"] is not None else "never"
        budget = BUDGETS[r["workload"]]
        net = f"{r['net_over_budget_s']:+,.0f} s" if r["net_over_budget_s"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | "
            f"{r['eager_s'] / r['compiled_s']:.2f}x | {r['compile_s']:.1f} | {payback} | "
            f"{f'{budget:,}' if budget else '-'} | {net} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", nargs="+", default=["vae", "unet"], choices=list(BUDGETS))
    parser.add_argument("--mode", choices=["whole", "blocks"], default="blocks")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after the compile)")
    parser.add_argument("--batch", type=int, default=None, help="default: the workload's")
    parser.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    args = parser.parse_args(argv)
    rows = [measure(name, args) for name in args.workloads]
    print(table(rows, args))
    return rows


if __name__ == "__main__":
    run_main(main)
