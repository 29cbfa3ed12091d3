"""The CPU thread policy (``ldm/utils/threads.py``) reaches torch before its pool starts, the user's own
``OMP_*`` variables win, DDP ranks and test workers split the cores, a process with the cores to itself
follows the cores other processes leave free; a run cut by its ``max_time`` guard says so in its summary and
finishes its step budget when resumed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.utils.threads import (
    OURS,
    AdaptiveThreads,
    CoreWatch,
    available_cores,
    may_adapt,
    share_cores,
    thread_env,
)
from tests.conftest import ROOT, load_script

PROBE = (
    "import os, sys; sys.argv = ['x']; import {module}; import torch; "
    "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'))"
)


def probe(module: str, **env: str) -> list[str]:
    """(torch threads, OMP_WAIT_POLICY, OMP_NUM_THREADS) in a fresh interpreter that imports ``module``
    (``train``, ``sample``) first, as running the script does, with no OMP variable but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", OURS, "PYTEST_XDIST"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_the_module_loads_nothing_heavy():
    """It must run before torch is imported: importing it imports no torch."""
    code = "import sys, ldm.utils.threads; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_train_and_sample_apply_the_policy_and_the_users_own_variables_win():
    """Each script sets what the user did not (one interpreter each: importing them is slow)."""
    cores = str(available_cores())
    assert probe("train") == [cores, "None", cores]  # torch's spin-waiting kept (PASSIVE loses idle)
    assert probe("train", OMP_NUM_THREADS="1") == ["1", "None", "1"]
    assert probe("sample", OMP_WAIT_POLICY="PASSIVE") == [cores, "PASSIVE", cores]


def test_processes_on_one_host_split_the_cores():
    assert thread_env({}, cores=8, processes=1)["OMP_NUM_THREADS"] == "8"
    assert thread_env({}, cores=8, processes=2)["OMP_NUM_THREADS"] == "4"
    assert thread_env({}, cores=2, processes=4)["OMP_NUM_THREADS"] == "1"  # never 0
    assert thread_env({"LOCAL_WORLD_SIZE": "4"}, cores=8)["OMP_NUM_THREADS"] == "2"  # torchrun
    assert thread_env({"PYTEST_XDIST_WORKER_COUNT": "2"}, cores=8)["OMP_NUM_THREADS"] == "4"
    assert thread_env({"OMP_NUM_THREADS": "3"}, cores=8) == {}
    # a DDP rank re-running train.py keeps the share its launcher gave it
    shared = {"OMP_NUM_THREADS": "4", OURS: "OMP_NUM_THREADS"}
    assert thread_env(shared, cores=8)["OMP_NUM_THREADS"] == "4"


def test_this_test_worker_has_its_share():
    """tests/conftest.py: pytest-xdist workers split the cores (one thread each without xdist)."""
    if "OMP_NUM_THREADS" not in os.environ.get(OURS, ""):
        return  # the user chose (OMP_NUM_THREADS set when pytest started)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or available_cores())
    assert torch.get_num_threads() == max(1, available_cores() // workers)


def test_share_cores_gives_each_rank_its_part(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(OURS, "OMP_NUM_THREADS,OMP_WAIT_POLICY")
    monkeypatch.setenv("OMP_NUM_THREADS", str(available_cores()))
    try:
        assert share_cores(2) == max(1, available_cores() // 2)
        assert torch.get_num_threads() == max(1, available_cores() // 2)
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))  # the ranks it launches
        monkeypatch.setenv(OURS, "OMP_WAIT_POLICY")  # the user's OMP_NUM_THREADS stands
        assert share_cores(2) is None
    finally:
        torch.set_num_threads(before)


def test_a_run_cut_by_max_time_says_so_and_resumes_to_its_step_budget(compose_cfg, caplog):
    from tests.test_train import tiny_overrides
    from train import train

    base = [
        *tiny_overrides("vae"),
        "callbacks.rich_progress_bar=null",
        "logger=csv",
        "trainer.max_steps=100000",
    ]
    first = compose_cfg([*base, "trainer.max_time=00:00:00:01"], output_name="first")
    with caplog.at_level(logging.INFO, logger="train"):
        _, objects = train(first)
    steps = objects["trainer"].global_step
    assert 0 < steps < 100_000
    summary = caplog.text[caplog.text.index("Run summary (vae)") :]
    assert "(max_time reached)" in summary
    assert f"stopped at {steps:,} of 100,000 steps: max_time ran out first" in summary
    assert "ckpt_path=last trainer.max_time=null" in summary
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == steps

    budget = steps + 2  # the suggested resume reaches the step budget instead of stopping at once
    resumed = compose_cfg(
        [*base[:-1], f"trainer.max_steps={budget}", "ckpt_path=last", "trainer.max_time=null"],
        output_name="second",
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        _, objects = train(resumed)
    assert objects["trainer"].global_step == budget
    assert "(max_steps reached)" in caplog.text and "stopped at" not in caplog.text


def test_threads_benchmark_steps_run_and_its_table_gives_ratios_to_torchs_default():
    bench = load_script("benchmarks/threads.py")
    assert set(bench.policies(2, [1000])) == {
        "torch default",
        "1 thread",
        "OMP_WAIT_POLICY=PASSIVE",
        "policy (OMP_NUM_THREADS=2, adapting)",
        "GOMP_SPINCOUNT=1000",
    }
    for workload in bench.WORKLOADS:
        bench.build_step(workload)()  # one training step of each measured workload
    results = {
        (load, "vae", name): {"times": [base * (load + 1), 3 * base], "threads": 2}
        for load in (0, 1)
        for name, base in (("torch default", 2.0), ("policy", 1.0))
    }
    rows = bench.table(results, [0, 1], ["torch default", "policy"], ["vae"]).splitlines()
    assert rows[2].startswith(
        "| vae | torch default | 2 | 4.000 (2.00-6.00) | 1.00 | 5.000 (4.00-6.00) | 1.00 |"
    )
    assert rows[3].startswith("| vae | policy | 2 | 2.000 (1.00-3.00) | 0.50 | 2.500 (2.00-3.00) | 0.50 |")


def test_unet_step_compiles_in_place_and_times_the_compiled_step():
    """``--compile blocks``: each transformer block compiled (the state dict keys unchanged: checkpoints and
    exact resume see the same model); the table gets a compiled row (the eager backend here: no C++
    build in a test)."""
    bench = load_script("benchmarks/unet_step.py")
    unet = bench.UNetModel(**bench.unet_kwargs("tiny"))
    keys = list(unet.state_dict())
    assert bench.compile_in_place(unet, "blocks", "eager") > 0
    assert list(unet.state_dict()) == keys
    argv = ["--config", "tiny", "--resolution", "8", "--batch", "2", "--steps", "1", "--warmup", "0"]
    argv += ["--context-length", "8", "--peak-size", "256", "--only-ours", "--compile", "blocks"]
    result = bench.main([*argv, "--compile-backend", "eager"])
    assert result["ours compiled"]["median_s"] > 0 and result["ours"]["median_s"] > 0


def fake_proc(folder: Path, user: int, nice: int, system: int, own: int) -> tuple[Path, Path]:
    """A /proc/stat first line and a /proc/self/stat line (utime = own, stime = 0), in clock ticks."""
    stat, mine = folder / "stat", folder / "self_stat"
    stat.write_text(f"cpu  {user} {nice} {system} 1000 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")
    fields = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0", str(own), "0"] + ["0"] * 30
    mine.write_text("123 (python (x)) " + " ".join(fields) + "\n")  # a ')' in the name, as comm allows
    return stat, mine


def test_core_watch_counts_other_processes_not_this_one_nor_lower_priority_ones(tmp_path):
    clock = iter([10.0, 12.0, 14.0])
    stat, mine = fake_proc(tmp_path, user=0, nice=0, system=0, own=0)
    watch = CoreWatch(stat, mine, clock=lambda: next(clock))
    watch.tick, watch.niced = 100, False
    # 2 s at 100 ticks/s: the machine busy 300 ticks at normal priority, 150 of them ours -> 0.75 core;
    # 400 ticks of niced work do not compete with a process at nice 0
    fake_proc(tmp_path, user=250, nice=400, system=50, own=150)
    assert watch.others() == 0.75
    watch.niced = True  # a niced process competes with the niced work too
    fake_proc(tmp_path, user=250, nice=600, system=50, own=150)
    assert watch.others() == 1.0


def test_core_watch_sees_a_busy_process():
    """The real /proc: a spinning child is another process's busy core (at least half of one, whatever
    else runs on this machine); this process's own spinning is not counted as someone else's."""
    if not Path("/proc/stat").is_file():
        return  # not Linux: nothing adapts (may_adapt is False there)
    watch = CoreWatch()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        assert watch.others() >= 0.5
    finally:
        busy.kill()
        busy.wait()


class Replay:
    """A CoreWatch stand-in giving other processes' load from a list."""

    def __init__(self, loads):
        self.loads = iter(loads)

    def others(self):
        return next(self.loads)


def test_adaptive_threads_use_the_cores_other_processes_leave_free():
    chosen = []
    adapter = AdaptiveThreads(
        cores=2, interval=0.0, watch=Replay([0.1, 1.0, 0.6, 0.2, None]), set_threads=chosen.append
    )
    results = [adapter.step() for _ in range(5)]
    assert results == [None, 1, None, 2, None]  # idle: 2 (no change); a busy core: 1; it left: 2 again
    assert chosen == [1, 2] and adapter.changes == 2
    assert [
        AdaptiveThreads(cores=8, watch=Replay([])).threads_for(x) for x in (0.0, 0.3, 0.31, 2.5, 9.0)
    ] == [8, 8, 7, 5, 1]
    waiting = AdaptiveThreads(cores=2, interval=3600.0, watch=Replay([2.0]), set_threads=chosen.append)
    assert waiting.step() is None and chosen == [1, 2]  # not before its interval


def test_only_a_process_with_the_cores_to_itself_adapts():
    cores = str(available_cores())
    assert may_adapt({OURS: "OMP_NUM_THREADS", "OMP_NUM_THREADS": cores})
    assert not may_adapt({"OMP_NUM_THREADS": cores})  # the user's own count stands
    assert not may_adapt({OURS: "OMP_NUM_THREADS", "OMP_NUM_THREADS": "0"})  # a DDP rank's / worker's share


def test_train_adapts_its_threads_and_says_so_unless_the_user_fixed_them(compose_cfg, caplog, monkeypatch):
    from callbacks.adaptive_threads import AdaptiveThreadsCallback
    from tests.test_train import tiny_overrides
    from train import train

    before = torch.get_num_threads()
    cfg = compose_cfg(
        [*tiny_overrides("vae"), "callbacks.rich_progress_bar=null", "logger=csv", "trainer.max_steps=3"]
    )
    monkeypatch.setenv(OURS, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", str(available_cores()))
    try:
        with caplog.at_level(logging.INFO, logger="train"):
            _, objects = train(cfg)
        assert any(isinstance(c, AdaptiveThreadsCallback) for c in objects["trainer"].callbacks)
        assert "adapting to the cores other processes leave free" in caplog.text
        assert "  threads: " in caplog.text[caplog.text.index("Run summary") :]
        monkeypatch.setenv(OURS, "")  # the user's OMP_NUM_THREADS: a fixed count
        caplog.clear()
        _, objects = train(
            compose_cfg(
                [
                    *tiny_overrides("vae"),
                    "callbacks.rich_progress_bar=null",
                    "logger=csv",
                    "trainer.max_steps=3",
                ],
                output_name="fixed",
            )
        )
        assert not any(isinstance(c, AdaptiveThreadsCallback) for c in objects["trainer"].callbacks)
    finally:
        torch.set_num_threads(before)
