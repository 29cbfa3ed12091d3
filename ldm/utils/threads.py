"""The CPU thread policy: how many threads torch uses and how its OpenMP threads wait, chosen before torch
starts its thread pool.

torch's default (every core, OpenMP threads spin-waiting between ops) is fastest on an idle machine and
collapses when another process holds a core: every op then waits on a descheduled peer that spins for its
time slice (``benchmarks/threads.py``: several times slower under one busy process). The policy:

- ``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep instead of spinning (lost idle: within noise);
- intra-op threads = the cores this process may use / the processes sharing them on this host (DDP ranks on
  one machine, pytest-xdist workers), at least 1; inter-op threads the same.

A user's own ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` always win. ``thread_env`` must run before the first
``import torch`` (OpenMP reads its environment once, when torch loads it), so this module imports nothing
heavy: entry points call ``os.environ.update(thread_env())`` first, then import the rest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# The variables this module set (not the user): later calls (a DDP rank re-running train.py, a smaller
# per-rank share) may change them; the user's own never.
OURS = "LDM_THREAD_POLICY"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def processes_sharing(env: Mapping[str, str]) -> int:
    """Processes of the same job sharing this host's cores: torchrun's ``LOCAL_WORLD_SIZE``, pytest-xdist's
    ``PYTEST_XDIST_WORKER_COUNT``; 1 otherwise (a Lightning DDP run knows its ranks later:
    ``share_cores``)."""
    for name in ("LOCAL_WORLD_SIZE", "PYTEST_XDIST_WORKER_COUNT"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def thread_env(
    env: Mapping[str, str] | None = None, cores: int | None = None, processes: int | None = None
) -> dict[str, str]:
    """The variables to add to ``env`` (default ``os.environ``): the policy's values for those the user has
    not set (see the module docstring); ``{}`` when they set both."""
    env = os.environ if env is None else env
    mine = set(env.get(OURS, "").split(",")) - {""}
    cores = available_cores() if cores is None else cores
    processes = processes_sharing(env) if processes is None else processes
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, cores // max(1, processes)))}
    if "OMP_NUM_THREADS" in mine and processes == 1:  # already shared out by a parent (a DDP launcher)
        wanted["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    chosen = {name: value for name, value in wanted.items() if name not in env or name in mine}
    if not chosen:
        return {}
    return {**chosen, OURS: ",".join(sorted(mine | set(chosen)))}


def apply_thread_policy(processes: int | None = None) -> dict[str, str]:
    """``os.environ.update(thread_env(...))``; when torch is already imported, also its intra-op thread
    count (the wait policy then only reaches child processes). Returns what was set."""
    chosen = thread_env(processes=processes)
    os.environ.update(chosen)
    if "OMP_NUM_THREADS" in chosen and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(chosen["OMP_NUM_THREADS"]))
    return chosen


def share_cores(ranks_on_host: int) -> int | None:
    """Give each of ``ranks_on_host`` processes (DDP ranks on this machine) its share of the cores, unless
    the user set ``OMP_NUM_THREADS``: this process's threads now, the ranks it launches through the
    environment. Returns the threads per rank (None: the user's setting stands)."""
    if ranks_on_host <= 1 or "OMP_NUM_THREADS" not in os.environ.get(OURS, "").split(","):
        return None
    threads = max(1, available_cores() // ranks_on_host)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads


def ranks_on_host(trainer) -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else the trainer's devices (one
    rank each)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, int(getattr(trainer, "num_devices", 1) or 1))


def set_interop_threads() -> None:
    """torch's inter-op pool (``torch.jit.fork``, a few parallel ops) sized like the intra-op one, once,
    before it starts (torch refuses a second call; then the pool keeps its size)."""
    import torch

    try:
        torch.set_num_interop_threads(torch.get_num_threads())
    except RuntimeError:  # already started or already set
        pass


def describe() -> str:
    """One line for logs: the threads and wait policy in effect, and who chose them."""
    import torch

    mine = set(os.environ.get(OURS, "").split(","))

    def source(name: str) -> str:
        return "policy" if name in mine else "yours" if name in os.environ else "torch default"

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"threads: {torch.get_num_threads()} intra-op ({source('OMP_NUM_THREADS')}), "
        f"{torch.get_num_interop_threads()} inter-op, OMP_WAIT_POLICY={policy} "
        f"({source('OMP_WAIT_POLICY')}); set OMP_NUM_THREADS / OMP_WAIT_POLICY to choose yourself"
    )
