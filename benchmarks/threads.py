"""Thread policies on an idle and a busy machine: one training step of the embedded VAE, UNet and LoRA.

Each (load, workload, policy) runs in its own process, with the policy's environment set before torch
loads; the load is 0, 1, 2 ... busy processes (``--busy spin``: a pure-Python loop each; ``--busy torch``:
a torch matmul loop at torch's defaults; nice 0) that this script starts and stops itself. The table gives
median seconds per step and, per load, the ratio to torch's default (every core, OpenMP threads
spin-waiting); ``policy`` is what ``train.py`` / ``sample.py`` choose (``ldm.utils.threads``: threads =
cores / processes sharing them, then, for a process with the cores to itself, the cores other processes
leave free, re-decided as it runs); its threads column gives the count it ended on at each load.

    python benchmarks/threads.py                         # 3 workloads x 4 policies x loads 0 1 2
    python benchmarks/threads.py --loads 1 --busy torch  # beside another torch job
    python benchmarks/threads.py --spincounts 1000 10000 # also libgomp spinning less before it sleeps

Workloads (fp32, the embedded experiments' shapes): ``vae`` f=4 VAE, batch 32 of 32 px, L1 + KL, Adam;
``unet`` the small UNet on 8x8x4 latents, batch 32, 20x64 context, eps loss, AdamW on every weight;
``lora`` the same UNet with rank-8 LoRA on attention, AdamW on the adapter only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.task import child_failure, run_main
from ldm.utils.threads import OURS, AdaptiveThreads, available_cores, may_adapt, thread_env

WORKLOADS = ("vae", "unet", "lora")
ADAPT_S = 0.5


def policies(cores: int, spincounts: list[int] = ()) -> dict[str, dict[str, str]]:
    """Candidate environments (on top of one without any OMP_* variable): torch's default, one thread, every
    core sleeping instead of spinning (``OMP_WAIT_POLICY=PASSIVE``: the policy before it was measured idle),
    the policy (every core, the count adapting to other processes' load), and every core with libgomp
    spinning ``GOMP_SPINCOUNT`` times before it sleeps (torch's default spins 300,000 times; PASSIVE 0)."""
    ours = thread_env({}, cores=cores, processes=1)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(ours.items()) if k != OURS)
    candidates = {
        "torch default": {},
        "1 thread": {"OMP_NUM_THREADS": "1"},
        "OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"},
        f"policy ({shown}, adapting)": ours,
    }
    for count in spincounts:
        candidates[f"GOMP_SPINCOUNT={count}"] = {"OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": str(count)}
    return candidates


def build_step(workload: str):
    """A closure running one training step of ``workload`` (see the module docstring)."""
    import hydra
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    if workload == "vae":
        cfg = OmegaConf.load(ROOT / "conf/model/vae/f4.yaml")
        cfg.resolution = 32
        vae = hydra.utils.instantiate(cfg)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, betas=(0.5, 0.9))
        x = torch.rand(32, 3, 32, 32) * 2 - 1

        def loss():
            recon, posterior = vae(x)
            return F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()

        params = list(vae.parameters())
    else:
        from ldm.modules.adapters.lora import UNET_ATTENTION, inject_lora, lora_parameters

        unet = hydra.utils.instantiate(OmegaConf.load(ROOT / "conf/model/unet/small.yaml"))
        params = list(unet.parameters())
        if workload == "lora":
            unet.requires_grad_(False)
            inject_lora(unet, UNET_ATTENTION, rank=8, alpha=8)
            params = lora_parameters(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        z, context = torch.randn(32, 4, 8, 8), torch.randn(32, 20, 64)

        def loss():
            t = torch.randint(0, 1000, (32,))
            noise = torch.randn_like(z)
            return F.mse_loss(unet(z + noise, t, context), noise)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def child(workload: str, steps: int, warmup: int, seconds: float) -> None:
    """Runs in the measured process: prints one JSON line with the step times (``steps`` of them, fewer
    when they pass ``seconds``: torch's default under load takes tens of seconds a step)."""
    import torch

    # the policy's run adapts its threads to the other processes' load (every ADAPT_S seconds here; a run's
    # first decision comes after its first seconds, which the warm-up stands in for)
    adapter = AdaptiveThreads(interval=ADAPT_S) if may_adapt() else None
    tick = adapter.step if adapter else (lambda: None)
    step = build_step(workload)
    began = time.perf_counter()
    for _ in range(warmup):
        tick()
        step()
    while adapter and time.perf_counter() - began < ADAPT_S:
        step()  # more warm-up until the first decision
    times = []
    began = time.perf_counter()
    while len(times) < steps and (not times or time.perf_counter() - began < seconds):
        tick()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "threads": torch.get_num_threads()}))


def measure(workload: str, env: dict[str, str], steps: int, warmup: int, seconds: float) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_", OURS))}
    command = [sys.executable, __file__, "--child", workload, "--steps", str(steps), "--warmup", str(warmup)]
    command += ["--seconds", str(seconds)]
    done = subprocess.run(command, check=False, env={**clean, **env}, capture_output=True, text=True)
    if done.returncode:
        raise child_failure(f"{workload} step with {env or 'no OMP variables'}", done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


BUSY = {
    # a pure-Python loop: one core busy, like a user's other work
    "spin": "while True: pass",
    # another torch job at torch's defaults (every core, spinning OpenMP threads): DDP ranks, test workers
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True: a @ a",
}


def busy_processes(count: int, kind: str = "spin") -> list[subprocess.Popen]:
    """``count`` busy processes of ``kind`` (``BUSY``; nice 0, torch's default environment)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_", OURS))}
    return [subprocess.Popen([sys.executable, "-c", BUSY[kind]], env=clean) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.2f}-{max(times):.2f})"


def table(results: dict, loads: list[int], names: list[str], workloads: list[str]) -> str:
    default = names[0]
    head = " | ".join(f"{n} busy: s/step (min-max) | x default" for n in loads)
    lines = [f"| workload | policy | threads | {head} |", "|---|---|---|" + "---|---|" * len(loads)]
    for workload in workloads:
        for name in names:
            cells = []
            for load in loads:
                times = results[load, workload, name]["times"]
                ratio = statistics.median(times) / statistics.median(
                    results[load, workload, default]["times"]
                )
                cells += [spread(times), f"{ratio:.2f}"]
            counts = [str(results[load, workload, name]["threads"]) for load in loads]
            threads = counts[0] if len(set(counts)) == 1 else "/".join(counts)  # the policy's, per load
            lines.append(f"| {workload} | {name} | {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2], help="busy processes per run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--seconds", type=float, default=10, help="stop timing a cell after this (at least 1 timed step)"
    )
    parser.add_argument(
        "--spincounts",
        nargs="*",
        type=int,
        default=[],
        help="also every core spinning this many times before sleeping (GOMP_SPINCOUNT), one candidate each",
    )
    parser.add_argument(
        "--busy", choices=list(BUSY), default="spin", help="what each busy process runs (see BUSY)"
    )
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.steps, args.warmup, args.seconds)
        return {}
    if min(args.loads) < 0 or args.steps < 1:
        parser.error("--loads must be >= 0 and --steps >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the busy processes too (finally)
    cores = available_cores()
    candidates = policies(cores, args.spincounts)
    names = list(candidates)
    results = {}
    for load in args.loads:
        load_avg = os.getloadavg()[0]
        busy = busy_processes(load, args.busy)
        try:
            for i, workload in enumerate(args.workloads):
                order = names[i % len(names) :] + names[: i % len(names)]  # no policy always first
                for name in order:
                    result = measure(workload, candidates[name], args.steps, args.warmup, args.seconds)
                    results[load, workload, name] = result
                    print(
                        f"{load} busy, {workload}, {name}: {spread(result['times'])} s/step", file=sys.stderr
                    )
        finally:
            stop(busy)
        print(f"load {load}: done (1-min load average before it: {load_avg:.2f})", file=sys.stderr)
    print(
        f"\n{cores} cores; up to {args.steps} timed steps (+{args.warmup} warm-up, {args.seconds:g} s cap) "
        f"per cell; busy processes: {args.busy} ({BUSY[args.busy]!r})\n"
    )
    print(table(results, args.loads, names, args.workloads))
    return {f"{load}/{workload}/{name}": r for (load, workload, name), r in results.items()}


if __name__ == "__main__":
    run_main(main)
