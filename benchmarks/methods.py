"""The fine-tuning methods on one txt2img base, seed by seed, scored with the project's exact evaluators (and
CLIP-T / CLIP-I / DINO when given the models): issue #23's adapter, pivotal-tuning, masked-loss and optimiser
measurements and issue #24's methods table.

    python benchmarks/methods.py --base <txt2img last.ckpt> --out methods_out --arms issue23
    python benchmarks/methods.py --base <txt2img last.ckpt> --out methods_out --arms issue24 \\
        --clip <experiment=clip run>/clip
    python benchmarks/methods.py --out methods_out --arms issue23,issue24 --collect     # the tables again

Every arm is an experiment plus overrides (``ARMS``); arms that train the same thing share one run
(``lora``, ``lora_star`` and ``adamw`` are one LoRA run on the star; ``unmasked`` is ``dreambooth_lora``).
Each run trains to its preset's ``trainer.max_steps`` (``--max-steps`` for all), in a child process (one
thread, ``nice``), ``--jobs`` at a time, and is then scored in this process:

  star runs (the held-out concept "star", LoRA-family files merged into the base): benchmarks/fidelity.py's
      scoring of the concept prompts (colour and shape right) and of known prompts (drift), the file's
      parameter count and size, seconds per step (between the adapter exports every ``--every`` steps) and the
      child's peak resident memory; arms marked "curve" (``prodigy``, ``adamw``) also score every export, for
      the steps to ``--target`` fidelity;
  subject runs (DreamBooth, DreamBooth-LoRA, two concepts, textual inversion, hypernetwork, pivotal tuning,
      masked / unmasked loss): benchmarks/subject_fidelity.py's scoring: the subject read back on backgrounds
      the instance images never had, the right background there, class and known prompts against the base;
  with ``--clip`` (a CLIPModel folder, e.g. an ``experiment=clip`` run's ``clip/``; ``--dino``: a DINO ViT
      folder): CLIP-T of the same samples against their prompts, CLIP-I (and DINO) against the concept's
      real images (ldm/modules/subject_metrics.py).

Resumable: run the same command again. Finished and scored runs are skipped, a killed run resumes from its
checkpoint with the highest step, a scored row is not scored again (unless ``--clip`` asks for columns it
lacks). Rows go to ``<out>/methods.csv`` (one per run and seed) and ``<out>/methods_curves.csv`` (one per
scored export); ``--collect`` (and the end of a grid) prints the tables (mean and min-max over seeds) and the
rank agreement (Spearman) of CLIP-T / CLIP-I / DINO with the exact evaluator over every scored run, and
writes them to ``<out>/methods.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.grid.method_scores import Scorer
from benchmarks.grid.method_tables import tables
from benchmarks.grid.runs import CHILD_ENV, Results, common_overrides, global_step, launch, resume_override
from ldm.utils.files import atomic_write_text
from ldm.utils.task import run_main

__all__ = ["ARMS", "CHILD_ENV", "Grid", "launch", "main"]


class Arm(NamedTuple):
    run: str  # the run folder's name: arms that train the same thing share it
    experiment: str
    overrides: tuple[str, ...] = ()
    kind: str = "subject"  # star (benchmarks/fidelity.py's scoring) | subject (subject_fidelity.py's)
    curve: bool = False  # score every export (steps to --target)
    note: str = ""


STAR = "experiment=lora_finetune"
LOCON = (
    "model.method.algo=locon",
    "model.method.rank=4",
    "model.method.alpha=4",
    "model.method.conv_rank=4",
    "model.method.conv_alpha=4",
)
PRODIGY = ("model/optimizer=prodigy", "model.optimizer.lr=1.0")
ONE_BACKGROUND = (
    "+data.concepts.0.instance_prompt='a {identifier} {class_noun}'",
    "data.concepts.0.instance_backgrounds=[white]",
)
ARMS = {
    # issue #23: the adapter algorithms on the star, at comparable trainable parameter counts (the embedded
    # base: lora rank 8 290 k, locon rank 4 + conv rank 4 381 k, loha rank 4 290 k, lokr factor 2 rank 16
    # 290 k, dora rank 8 310 k)
    "lora": Arm("lora", STAR, ("model.method.algo=lora",), "star", note="rank 8"),
    "locon": Arm("locon", STAR, LOCON, "star", note="rank 4, 3x3 convs rank 4"),
    "loha": Arm(
        "loha",
        STAR,
        ("model.method.algo=loha", "model.method.rank=4", "model.method.alpha=4"),
        "star",
        note="rank 4",
    ),
    "lokr": Arm(
        "lokr",
        STAR,
        ("model.method.algo=lokr", "model.method.factor=2", "model.method.rank=16", "model.method.alpha=16"),
        "star",
        note="factor 2, rank 16",
    ),
    "dora": Arm("dora", STAR, ("model.method.algo=dora",), "star", note="rank 8"),
    # pivotal tuning vs the same data, steps and LoRA without the token
    "pivotal": Arm("pivotal", "experiment=pivotal_tuning", note="token + LoRA rank 8"),
    "lora_named": Arm(
        "lora_named",
        "experiment=pivotal_tuning",
        ("model/method=lora", "~model.method.textual_inversion", "~model.method.token_lr"),
        note="LoRA rank 8 alone, pivotal_tuning's data and steps",
    ),
    # masked vs unmasked loss: DreamBooth-LoRA; the figure is the right background on unseen backgrounds
    "masked": Arm(
        "masked", "experiment=dreambooth_lora", ("data.masked_loss=true",), note="data.masked_loss=true"
    ),
    "unmasked": Arm("dreambooth_lora", "experiment=dreambooth_lora", note="= dreambooth_lora"),
    # ... and where the unmasked loss copies the background: captions "a zwx square", every image on white
    # (not blue: the base draws bare prompts on blue)
    "masked_1bg": Arm(
        "masked_1bg",
        "experiment=dreambooth_lora",
        (*ONE_BACKGROUND, "data.masked_loss=true"),
        note="one background, captions without it, masked",
    ),
    "unmasked_1bg": Arm(
        "unmasked_1bg", "experiment=dreambooth_lora", ONE_BACKGROUND, note="the same, unmasked"
    ),
    # Prodigy vs AdamW: steps to the fidelity line (the same LoRA, schedule and steps; lr 1.0 vs 1e-3)
    "prodigy": Arm(
        "prodigy",
        STAR,
        PRODIGY,
        "star",
        curve=True,
        note="model/optimizer=prodigy, lr 1.0",
    ),
    "adamw": Arm("lora", STAR, ("model.method.algo=lora",), "star", curve=True, note="= lora, lr 1e-3"),
    # ... and on LoCon, the adapter that reaches the line on the README chain's base
    "prodigy_locon": Arm(
        "prodigy_locon", STAR, (*LOCON, *PRODIGY), "star", curve=True, note="= locon, prodigy lr 1.0"
    ),
    "adamw_locon": Arm("locon", STAR, LOCON, "star", curve=True, note="= locon, AdamW lr 1e-3"),
    # issue #24 item 5: every method, both metric kinds
    "lora_star": Arm("lora", STAR, ("model.method.algo=lora",), "star", note="= lora"),
    "textual_inversion": Arm("textual_inversion", "experiment=textual_inversion", note="named object <gem>"),
    "hypernetwork": Arm("hypernetwork", "experiment=hypernetwork", note="named object gem"),
    "dreambooth": Arm("dreambooth", "experiment=dreambooth", note="full UNet + text encoder, zwx square"),
    "dreambooth_lora": Arm(
        "dreambooth_lora", "experiment=dreambooth_lora", note="LoCon rank 16 + convs rank 8, zwx square"
    ),
    "dreambooth_lora_rank8": Arm(
        "dreambooth_lora_rank8",
        "experiment=dreambooth_lora",
        ("model.method.algo=lora", "model.method.rank=8", "model.method.alpha=8"),
        note="LoRA rank 8 (attention only), zwx square",
    ),
    "dreambooth_locon": Arm(
        "dreambooth_locon",
        "experiment=dreambooth_lora",
        LOCON,
        note="LoCon rank 4 + convs rank 4, zwx square",
    ),
    "two_concepts": Arm(
        "two_concepts",
        "experiment=dreambooth",
        ("data=dreambooth_two_concepts", "model/method=full"),
        note="full UNet, zwx + qwe",
    ),
}
GROUPS = {
    "issue23": [
        "lora",
        "locon",
        "loha",
        "lokr",
        "dora",
        "pivotal",
        "lora_named",
        "masked",
        "unmasked",
        "masked_1bg",
        "unmasked_1bg",
        "prodigy",
        "adamw",
        "prodigy_locon",
        "adamw_locon",
    ],
    "issue24": [
        "lora_star",
        "textual_inversion",
        "hypernetwork",
        "dreambooth",
        "dreambooth_lora",
        "dreambooth_lora_rank8",
        "dreambooth_locon",
        "two_concepts",
    ],
}
GROUPS["all"] = list(dict.fromkeys(GROUPS["issue23"] + GROUPS["issue24"]))


def run_overrides(overrides: list[str], run: str) -> list[str]:
    """The ``--override`` values for one run: ``<arm or run>:<override>`` only for that arm's run, the
    others for every run."""
    chosen = []
    for override in overrides:
        head, sep, rest = override.partition(":")
        if sep and "=" not in head and head in {*ARMS, *(a.run for a in ARMS.values())}:
            if run in (head, ARMS[head].run if head in ARMS else head):
                chosen.append(rest)
        else:
            chosen.append(override)
    return chosen


def trained_steps(run_dir: Path) -> int:
    """The global step of the run's newest checkpoint (``last.ckpt`` included: the end of fit saves one)."""
    found = [global_step(p) for p in (run_dir / "checkpoints").glob("*.ckpt")]
    return max(found, default=0)


def wait_child(proc) -> tuple[int | None, float | None]:
    """(exit code or None while it runs, its peak resident memory in MiB): ``os.wait4`` reaps the child with
    its own resource usage (``nice`` execs Python in the same process). A launcher's stand-in without a
    ``pid`` (tests) is polled."""
    if not hasattr(proc, "pid"):
        return proc.poll(), None
    if proc.returncode is not None:
        return proc.returncode, None
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None, None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # KiB on Linux


class Grid:
    """Every (run, seed) trains to its budget in one child process (``--jobs`` at a time; a killed run
    resumes from its checkpoint with the highest step); between polls this process scores what is ready:
    the exports of curve runs as they appear, each finished run once."""

    def __init__(self, args, results: Results, curves: Results, scorer):
        self.args, self.results, self.curves, self.scorer = args, results, curves, scorer
        self.arms = {name: ARMS[name] for name in args.arms}
        self.runs: dict[tuple[str, int], Arm] = {}
        for seed in args.seeds:
            for arm in self.arms.values():
                self.runs.setdefault((arm.run, seed), arm)
        self.curve_runs = {arm.run for arm in self.arms.values() if arm.curve}
        self.active: dict[tuple[str, int], object] = {}
        self.failed: set[tuple[str, int]] = set()
        self.launched = 0

    def run_dir(self, key: tuple[str, int]) -> Path:
        return Path(self.args.out) / "runs" / f"{key[0]}_s{key[1]}"

    def state(self, key) -> dict:
        path = self.run_dir(key) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def finished(self, key) -> bool:
        """Trained: to ``--max-steps``, or to its preset's budget, or asked for this budget before and
        stopped short by its own limits (``max_epochs``, ``max_time``), so not launched again."""
        done = self.state(key)
        if not done:
            return False
        asked = self.args.max_steps
        return asked is None or done["steps"] >= asked or done.get("asked") == asked

    def argv(self, key) -> list[str]:
        arm, run_dir = self.runs[key], self.run_dir(key)
        every = self.args.every if arm.kind == "star" else 0  # LoRA-family exports are small files
        return [
            arm.experiment,
            *arm.overrides,
            f"model.base={self.args.base}",
            f"seed={key[1]}",
            *([f"trainer.max_steps={self.args.max_steps}"] if self.args.max_steps else []),
            "++trainer.limit_val_batches=0",  # the scoring below is the benchmark's evaluation
            "trainer.log_every_n_steps=50",
            "callbacks.model_checkpoint.monitor=null",
            "callbacks.model_checkpoint.save_top_k=1",  # the newest step checkpoint: for resuming only
            f"++callbacks.model_checkpoint.every_n_train_steps={self.args.ckpt_every}",
            f"callbacks.adapter_export.every_n_steps={every}",
            *common_overrides(run_dir),
            *run_overrides(self.args.override, key[0]),
            *resume_override(run_dir),
        ]

    def start(self) -> None:
        waiting = [
            k for k in self.runs if k not in self.active and k not in self.failed and not self.finished(k)
        ]
        for key in waiting[: max(0, self.args.jobs - len(self.active))]:
            run_dir = self.run_dir(key)
            run_dir.mkdir(parents=True, exist_ok=True)
            argv = self.argv(key)
            resuming = " (resuming)" if argv[-1].startswith("ckpt_path=") else ""
            print(f"start {key[0]} seed {key[1]}{resuming}: {run_dir}", flush=True)
            self.active[key] = launch(argv, run_dir / "train.log", self.args.nice)
            self.launched += 1

    def reap(self) -> None:
        for key, proc in list(self.active.items()):
            code, peak = wait_child(proc)
            if code is None:
                continue
            del self.active[key]
            run_dir = self.run_dir(key)
            if code != 0:
                self.failed.add(key)
                log = (run_dir / "train.log").read_text(errors="replace")[-2000:]
                print(f"FAILED {key[0]} seed {key[1]} (exit {code}); the end of its log:\n{log}", flush=True)
                continue
            old = self.state(key)
            peaks = [p for p in (old.get("peak_rss_mib"), peak) if p is not None]
            done = {
                "steps": trained_steps(run_dir),
                "asked": self.args.max_steps,
                "peak_rss_mib": round(max(peaks), 1) if peaks else None,
                "finished": time.time(),
            }
            atomic_write_text(run_dir / "done.json", json.dumps(done))
            print(f"{key[0]} seed {key[1]}: trained to step {done['steps']}", flush=True)

    def score_one(self) -> bool:
        """Score one thing that is ready (curve exports first, in step order); False when nothing is."""
        for key, arm in self.runs.items():
            if key[0] in self.curve_runs:
                for step, path in self.scorer.step_exports(self.run_dir(key)):
                    if not self.curves.has(key[0], key[1], step):
                        row = self.scorer.curve_point(path)
                        self.curves.add({"run": key[0], "seed": key[1], "step": step, **row})
                        print(
                            f"{key[0]:18s} seed {key[1]} step {step:5d}: fidelity {row['fidelity']:.3f}",
                            flush=True,
                        )
                        return True
        for key, arm in self.runs.items():
            if key in self.active or not self.state(key):
                continue
            steps = self.state(key)["steps"]
            old = self.results.find(key[0], key[1], steps)
            if old is not None and all(old.get(c) for c in self.scorer.metric_names):
                continue
            row = self.scorer.final(arm, self.run_dir(key), self.state(key))
            self.results.add({"run": key[0], "seed": key[1], "step": steps, **row})
            print(
                f"{key[0]:18s} seed {key[1]} scored: exact {row['exact']:.3f} ({row['eval_s']} s)", flush=True
            )
            return True
        return False

    def loop(self) -> None:
        while True:
            self.reap()
            self.start()
            if self.score_one():
                continue
            if not self.active:
                return
            time.sleep(self.args.poll)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="the txt2img base every arm fine-tunes (a last.ckpt)")
    p.add_argument("--out", default="methods_out", help="runs, methods.csv, methods_curves.csv, methods.md")
    p.add_argument("--arms", default="all", help=f"comma list of arms {list(ARMS)} or groups {list(GROUPS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=None, help="every run's budget (default: its preset's)")
    p.add_argument(
        "--every", type=int, default=50, help="star runs export their adapter every N steps (curves, s/step)"
    )
    p.add_argument("--ckpt-every", type=int, default=100, help="a checkpoint to resume from every N steps")
    p.add_argument(
        "--target", type=float, default=0.7, help="the fidelity line of the curve arms (the LoRA target)"
    )
    p.add_argument(
        "--n", type=int, default=None, help="samples per prompt set (default: 90 star, 40 subject)"
    )
    p.add_argument("--curve-n", type=int, default=45, help="concept prompts per curve point")
    p.add_argument("--sampler-steps", type=int, default=20, help="DPM++ 2M steps for every score")
    p.add_argument("--clip", default=None, help="a CLIPModel folder: CLIP-T and CLIP-I (docs/evaluation.md)")
    p.add_argument("--dino", default=None, help="a DINO ViT folder: DINO")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--nice", type=int, default=19)
    p.add_argument("--poll", type=float, default=15.0, help="seconds between looks at the runs")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra train.py override for every run, or <arm>:<override> for one arm's run",
    )
    p.add_argument("--collect", action="store_true", help="only print and write the tables")
    args = p.parse_args(argv)
    names = [a for part in args.arms.split(",") for a in GROUPS.get(part, [part])]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)} or {list(GROUPS)}")
    args.arms = list(dict.fromkeys(names))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not args.collect and not args.base:
        p.error("--base is required to train: the txt2img checkpoint every arm fine-tunes")
    if args.base and not Path(args.base).is_file():
        p.error(f"--base={args.base}: no such file (a txt2img run's checkpoints/last.ckpt)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, curves = Results(out / "methods.csv", key="run"), Results(out / "methods_curves.csv", key="run")
    grid = None
    if not args.collect:
        torch.set_num_threads(1)
        if args.nice:
            os.nice(args.nice)
        started = time.time()
        grid = Grid(args, results, curves, Scorer(args))
        grid.loop()
        print(
            f"grid finished in {time.time() - started:.0f} s ({grid.launched} training runs started)",
            flush=True,
        )
    text = tables(args, ARMS, results, curves)
    atomic_write_text(out / "methods.md", text)
    print(f"\n{text}\nwrote {out / 'methods.md'}", flush=True)
    failed = sorted(grid.failed) if grid else []
    if failed:
        print(f"failed runs (see their train.log): {failed}", flush=True)
    return {
        "rows": results.rows,
        "curves": curves.rows,
        "launched": grid.launched if grid else 0,
        "failed": failed,
        "table": text,
    }


if __name__ == "__main__":
    run_main(main)
