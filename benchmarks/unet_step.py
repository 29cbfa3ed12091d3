"""One training step (forward + backward, fp32) of our UNet vs diffusers' UNet2DConditionModel.

Both models get the same architecture (default: the full SD v1.5 UNet from
``conf/model/unet/sd15.yaml``) and the same batch; steps alternate between the two so that both
see the same machine state. Prints a markdown table with median step times, the ratio
ours/diffusers, and model FLOPs utilisation: FLOPs of one step (``FlopCounterMode``) / step time /
a fp32 matmul peak measured in the same run. Wall and process-CPU ratios are reported as
ratio of medians, of minima, and median of the per-pair ratios (adjacent steps).

    python benchmarks/unet_step.py                      # sd15, 32x32 latents, batch 1
    python benchmarks/unet_step.py --config small --resolution 8 --batch 32
    python benchmarks/unet_step.py --device cuda        # on a GPU (steps synchronised before timing)
    python benchmarks/unet_step.py --config small --resolution 8 --batch 32 --compile blocks

``--compile whole|blocks`` adds each model compiled with ``torch.compile`` (in place, so its state dict is
unchanged): the whole model, or each repeated transformer block (diffusers' ``compile_repeated_blocks``: the
same code compiled once, reused); compile time = its first step minus the eager median; pay-back = compile
time / the time a compiled step saves.

When other processes load the cores, multi-threaded steps collapse (OpenMP threads wait on a
descheduled peer at every op) and the numbers mostly measure the neighbours; ``--threads 1``
then gives a stable comparison.
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
from torch.utils.flop_counter import FlopCounterMode

from ldm.io.diffusers_config import diffusers_config_from_ldm
from ldm.modules.unet import UNetModel
from ldm.utils.task import run_main


def unet_kwargs(config: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/unet" / f"{config}.yaml"))
    cfg.pop("_target_")
    return cfg


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall times measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def matmul_peak_flops(n: int = 2048, repeats: int = 10, device: torch.device = CPU) -> float:
    """Best observed fp32 FLOP/s of an n x n matmul on ``device``."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_step(model: torch.nn.Module, x, t, context, target, unwrap=lambda out: out):
    def step() -> None:
        loss = F.mse_loss(unwrap(model(x, t, context)), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def compile_in_place(model: torch.nn.Module, how: str, backend: str = "inductor") -> int:
    """``whole``: ``model.compile()``; ``blocks``: every ``BasicTransformerBlock`` (ours and diffusers' share
    the name). Returns the number of modules compiled."""
    if how == "whole":
        targets = [model]
    else:
        targets = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for module in targets:
        module.compile(backend=backend)
    return len(targets)


def add_compiled(steps: dict, models: dict, batch: tuple, args, device: torch.device) -> dict[str, float]:
    """Adds ``<name> compiled`` steps (deep copies, compiled as ``args.compile`` says); returns each one's
    first-step wall time (compilation included)."""
    first = {}
    for name, (model, unwrap) in list(models.items()):
        twin = copy.deepcopy(model)
        compile_in_place(twin, args.compile, args.compile_backend)
        step = make_step(twin, *batch, unwrap=unwrap)
        first[f"{name} compiled"] = timed(step, device)[0]
        steps[f"{name} compiled"] = step
    return first


def compile_table(walls: dict[str, list[float]], first: dict[str, float]) -> None:
    print("\n| model | eager s/step | compiled s/step | speed-up | compile s | steps to pay back |")
    print("|---|---|---|---|---|---|")
    for name, first_wall in first.items():
        eager = statistics.median(walls[name.removesuffix(" compiled")])
        compiled = statistics.median(walls[name])
        cost = first_wall - compiled
        saved = eager - compiled
        payback = f"{cost / saved:,.0f}" if saved > 0 else "never"
        print(f"| {name} | {eager:.3f} | {compiled:.3f} | {eager / compiled:.2f}x | {cost:.1f} | {payback} |")


def timed(step, device: torch.device = CPU) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, GPU work included."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="sd15", help="conf/model/unet/<config>.yaml")
    parser.add_argument("--resolution", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only-ours", action="store_true", help="skip diffusers (profiling)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument(
        "--compile", choices=["whole", "blocks"], default=None, help="also time each model torch.compile'd"
    )
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: eager
    # tests: a small matmul
    parser.add_argument("--peak-size", type=int, default=2048, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: no CUDA device is visible here; run on a GPU machine or "
            "use --device cpu"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    kwargs = unet_kwargs(args.config)
    ours = UNetModel(**kwargs).train().to(device)
    x = torch.randn(args.batch, kwargs["in_channels"], args.resolution, args.resolution, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    context = torch.randn(args.batch, args.context_length, kwargs["context_dim"], device=device)
    target = torch.randn(args.batch, kwargs["out_channels"], args.resolution, args.resolution, device=device)
    steps = {"ours": make_step(ours, x, t, context, target)}
    models = {"ours": (ours, lambda out: out)}
    params = {"ours": sum(p.numel() for p in ours.parameters())}
    if not args.only_ours:
        from diffusers import UNet2DConditionModel

        theirs = UNet2DConditionModel(**diffusers_config_from_ldm(**kwargs)).train().to(device)
        steps["diffusers"] = make_step(theirs, x, t, context, target, unwrap=lambda out: out.sample)
        models["diffusers"] = (theirs, lambda out: out.sample)
        params["diffusers"] = sum(p.numel() for p in theirs.parameters())

    flops = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
    first = add_compiled(steps, models, (x, t, context, target), args, device) if args.compile else {}
    for name in first:
        flops[name], params[name] = (
            flops[name.removesuffix(" compiled")],
            params[name.removesuffix(" compiled")],
        )
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    peak = matmul_peak_flops(args.peak_size, device=device)
    walls: dict[str, list[float]] = {name: [] for name in steps}
    cpus: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.steps):
        for name in names if i % 2 == 0 else names[::-1]:
            wall, cpu = timed(steps[name], device)
            walls[name].append(wall)
            cpus[name].append(cpu)
    peak = max(peak, matmul_peak_flops(args.peak_size, device=device))

    median = statistics.median
    print(
        f"\nconfig={args.config} latents={args.batch}x{kwargs['in_channels']}x{args.resolution}x"
        f"{args.resolution} context={args.context_length}x{kwargs['context_dim']} fp32 {device} "
        f"threads={torch.get_num_threads()} steps={args.steps} (+{args.warmup} warmup) "
        f"loadavg={os.getloadavg()[0]:.1f}\n"
    )
    print("| model | params | median step (s) | min step (s) | median CPU (s) | GFLOP/step | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in steps:
        achieved = flops[name] / median(walls[name])
        print(
            f"| {name} | {params[name] / 1e6:.1f}M | {median(walls[name]):.3f} | {min(walls[name]):.3f} | "
            f"{median(cpus[name]):.3f} | {flops[name] / 1e9:.1f} | {achieved / 1e9:.1f} | "
            f"{achieved / peak:.1%} |"
        )
    print(
        f"\nMFU = FLOPs per step / median step time / fp32 matmul peak "
        f"({peak / 1e9:.1f} GFLOP/s, best {args.peak_size}^3 mm in this run, {torch.get_num_threads()} "
        "threads)"
    )
    if "diffusers" in steps:

        def ratios(ours: list[float], theirs: list[float]) -> str:
            paired = median(a / b for a, b in zip(ours, theirs))
            return (
                f"medians {median(ours) / median(theirs):.3f}, mins {min(ours) / min(theirs):.3f}, "
                f"paired steps {paired:.3f}"
            )

        print(f"ratio ours/diffusers, wall: {ratios(walls['ours'], walls['diffusers'])}")
        print(f"ratio ours/diffusers, CPU:  {ratios(cpus['ours'], cpus['diffusers'])}")
    if first:
        compile_table(walls, first)
    return {name: {"median_s": median(walls[name]), "gflop": flops[name] / 1e9} for name in steps}


if __name__ == "__main__":
    run_main(main)
