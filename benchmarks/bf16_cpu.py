"""bf16 on this CPU: one UNet training step (forward + backward + SGD update) in fp32, under bf16 autocast
(``trainer.precision=bf16-mixed``) and with bf16 weights (``model.bf16_weights=true``, stochastic rounding),
median of ``--steps`` steps after a warm-up step, for the embedded task's UNet and the SD v1.5 UNet.

    python benchmarks/bf16_cpu.py                        # small UNet 8x8x4 latents b32, SD 1.5 UNet 32x32 b1
    python benchmarks/bf16_cpu.py --cases small          # seconds
The embedded task's loss with bf16: ``benchmarks/savers_curve.py`` (rows +bf16_mixed and +bf16_weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.models.bf16_weights import StochasticRoundingOptimizer, use_bf16_weights
from ldm.utils.task import run_main

# name -> (unet preset, latent size, batch)
CASES = {"small": ("small", 8, 32), "sd15": ("sd15", 32, 1), "tiny": ("tiny", 8, 2)}
MODES = ("fp32", "bf16-mixed", "bf16-weights")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def build(preset: str, mode: str):
    torch.manual_seed(0)
    unet = instantiate(OmegaConf.load(ROOT / "conf/model/unet" / f"{preset}.yaml"))
    sgd = functools.partial(torch.optim.SGD, lr=1e-5)  # stateless: the step is forward + backward + update
    if mode == "bf16-weights":
        use_bf16_weights(unet)
        return unet, StochasticRoundingOptimizer(list(unet.parameters()), sgd)
    return unet, sgd(params=list(unet.parameters()))


def step(unet, optimizer, mode: str, size: int, batch: int) -> float:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(batch, unet.in_channels, size, size, generator=generator)
    context = torch.randn(batch, 77, unet.context_dim, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
        loss = torch.nn.functional.mse_loss(unet(z, t, context).float(), z)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(case: str, steps: int) -> dict:
    """One mode at a time (three SD 1.5 UNets with gradients would not fit next to each other in 23 GiB)."""
    preset, size, batch = CASES[case]
    times: dict[str, list[float]] = {}
    for mode in MODES:
        unet, optimizer = build(preset, mode)
        times[mode] = [step(unet, optimizer, mode, size, batch) for _ in range(steps + 1)][1:]  # 1st: warm-up
        del unet, optimizer
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {
        "case": case,
        "latents": f"{batch}x4x{size}x{size}",
        "median_s": medians,
        "spread_s": {mode: [min(v), max(v)] for mode, v in times.items()},
        "ratio_to_fp32": {mode: medians[mode] / medians["fp32"] for mode in MODES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["small", "sd15"], choices=list(CASES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    flags = cpu_flags()
    print(
        f"CPU bf16 support: avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags}; "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = [measure(case, args.steps) for case in args.cases]
    print(f"\n| UNet step, median of {args.steps} | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for row in rows:
        cells = [f"{row['median_s'][m]:.3f} s ({row['ratio_to_fp32'][m]:.2f}x)" for m in MODES]
        print(f"| {row['case']} ({row['latents']}) | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "flags_bf16": sorted(f for f in flags if "bf16" in f), "rows": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    run_main(main)
