"""The CPU thread policy: how many threads torch uses, chosen before torch starts its thread pool and
re-decided while a run trains.

torch's default (every core, OpenMP threads spin-waiting between ops) is fastest on an idle machine and
collapses when another process holds a core: every op then waits on a descheduled peer that spins for its
time slice. Measured on an idle 2-core machine (``benchmarks/threads.py``, docs/scale.md), sleeping instead of
spinning (``OMP_WAIT_POLICY=PASSIVE``) loses 15-80% idle, and what wins under load is simply fewer threads
than cores. The policy:

- intra-op threads = the cores this process may use / the processes sharing them on this host (DDP ranks on
  one machine, pytest-xdist workers), at least 1; inter-op threads the same; torch's spin-waiting kept;
- a process that has the cores to itself (one rank) adapts its thread count while it runs
  (``AdaptiveThreads``): every couple of seconds it reads how many cores other processes kept busy
  (``/proc/stat`` minus its own CPU time; other processes at a lower priority than it do not count) and uses
  the cores they left free, so on an idle machine it runs as torch's default and beside a busy process it
  never waits on a descheduled thread for long.

A user's own ``OMP_NUM_THREADS`` (a fixed count: nothing adapts) / ``OMP_WAIT_POLICY`` always win.
``thread_env`` must run before the first ``import torch`` (OpenMP reads its environment once, when torch
loads it), so this module imports nothing heavy: entry points call ``os.environ.update(thread_env())``
first, then import the rest.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

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
    """The variables to add to ``env`` (default ``os.environ``): the policy's thread count unless the user set
    ``OMP_NUM_THREADS`` (see the module docstring); ``{}`` when they did."""
    env = os.environ if env is None else env
    mine = set(env.get(OURS, "").split(",")) - {""}
    cores = available_cores() if cores is None else cores
    processes = processes_sharing(env) if processes is None else processes
    wanted = {"OMP_NUM_THREADS": str(max(1, cores // max(1, processes)))}
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
    adapting = ", adapting to the cores other processes leave free" if may_adapt() else ""
    return (
        f"threads: {torch.get_num_threads()} intra-op ({source('OMP_NUM_THREADS')}{adapting}), "
        f"{torch.get_num_interop_threads()} inter-op, OMP_WAIT_POLICY={policy} "
        f"({source('OMP_WAIT_POLICY')}); set OMP_NUM_THREADS / OMP_WAIT_POLICY to choose yourself"
    )


# Other processes' busy cores are rounded up once they pass this much of a core: a desktop's background
# (a browser tab, an editor) does not cost a thread, a process that keeps a core busy does.
SLACK = 0.3


def may_adapt(env: Mapping[str, str] | None = None) -> bool:
    """Whether the thread count may follow the machine's load: the policy chose it (not the user) and gave
    this process every core (no DDP ranks or test workers sharing them), on Linux (``/proc/stat``)."""
    env = os.environ if env is None else env
    mine = set(env.get(OURS, "").split(","))
    return (
        "OMP_NUM_THREADS" in mine
        and env.get("OMP_NUM_THREADS") == str(available_cores())
        and Path("/proc/stat").is_file()
    )


class CoreWatch:
    """Cores that *other* processes kept busy between two calls of ``others()``: the machine's busy CPU time
    (``/proc/stat``) minus this process's own (``/proc/self/stat``), over the wall time between the calls.
    Processes niced below this one (``nice`` time, when this process is not niced) do not count: the
    scheduler gives this one the core first."""

    def __init__(
        self,
        stat: str | Path = "/proc/stat",
        own: str | Path = "/proc/self/stat",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stat, self.own, self.clock = Path(stat), Path(own), clock
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.niced = os.nice(0) > 0 if hasattr(os, "nice") else False
        self.last = self.sample()

    def sample(self) -> tuple[float, int, int, int] | None:
        """(wall seconds, the machine's busy ticks at normal priority, at nice > 0, this process's ticks)."""
        try:
            fields = [int(v) for v in self.stat.read_text().split("\n", 1)[0].split()[1:9]]
            own = self.own.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
        return self.clock(), user + system + irq + softirq + steal, nice, int(own[11]) + int(own[12])

    def others(self) -> float | None:
        """Other processes' busy cores since the last call (None: nothing to read, or no time passed)."""
        now = self.sample()
        last, self.last = self.last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        normal, niced, own = (now[i] - last[i] for i in (1, 2, 3))
        busy = normal + (niced if self.niced else 0) - own
        return max(0.0, busy / self.tick / (now[0] - last[0]))


class AdaptiveThreads:
    """torch's intra-op thread count = the cores other processes leave free (at least 1), re-decided at most
    every ``interval`` seconds when ``step()`` is called (a training step, a sampling batch)."""

    def __init__(
        self,
        cores: int | None = None,
        interval: float = 2.0,
        watch: CoreWatch | None = None,
        set_threads: Callable[[int], None] | None = None,
    ) -> None:
        self.cores = cores or available_cores()
        self.interval = interval
        self.watch = watch or CoreWatch()
        self.set_threads = set_threads
        self.threads = self.cores
        self.checked = time.monotonic()
        self.changes = 0

    def threads_for(self, others: float) -> int:
        return max(1, self.cores - max(0, math.ceil(others - SLACK)))

    def step(self) -> int | None:
        """Re-decide when ``interval`` has passed; the new thread count when it changed, else None."""
        now = time.monotonic()
        if now - self.checked < self.interval:
            return None
        self.checked = now
        others = self.watch.others()
        if others is None:
            return None
        wanted = self.threads_for(others)
        if wanted == self.threads:
            return None
        self.threads = wanted
        self.changes += 1
        if self.set_threads is None:
            import torch

            torch.set_num_threads(wanted)
        else:
            self.set_threads(wanted)
        return wanted
