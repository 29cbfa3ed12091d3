"""How ``benchmarks/methods.py`` scores a run: star runs with benchmarks/fidelity.py's scoring, subject runs
with benchmarks/subject_fidelity.py's (the exact shapes evaluator), both with CLIP-T / CLIP-I / DINO on the
same samples when the metric models are given; and what the run cost (its file, seconds per step, peak
memory)."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import fidelity, subject_fidelity
from datamodules.shapes_evaluator import ShapesEvaluator
from ldm.diffusion import build_sampler
from ldm.models.pipeline import load_for_sampling
from ldm.modules.subject_metrics import SubjectMetrics

SEED = 1234  # the evaluators' sampling seed
SUBJECT_GUIDANCE = 3.0  # subject_fidelity.py's default


def cycled(prompts: list[str], n: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]


def step_exports(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) of the adapter exports every N steps (``<name>-step000050.safetensors``)."""
    found = []
    for path in (run_dir / "adapters").glob("*-step*"):
        step = path.name.rsplit("-step", 1)[1].split(".")[0]
        if step.isdigit() and path.suffix in (".safetensors", ".pt"):
            found.append((int(step), path))
    return sorted(found)


def file_params(path: Path) -> int | None:
    """Tensor elements of a safetensors file, without the per-layer ``alpha`` scalars: the trainable
    parameters of a LoRA-family file."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in list(handle.keys()):
            if not key.endswith(".alpha"):
                total += int(np.prod(handle.get_slice(key).get_shape(), dtype=np.int64))
    return total


def seconds_per_step(run_dir: Path) -> float | None:
    """The median time between consecutive adapter exports, per step (a gap over a kill and resume is an
    outlier the median ignores); None with fewer than two exports."""
    exports = step_exports(run_dir)
    rates = [
        (b.stat().st_mtime - a.stat().st_mtime) / (t - s)
        for (s, a), (t, b) in itertools.pairwise(exports)
        if t > s
    ]
    return statistics.median(rates) if rates else None


def run_costs(run_dir: Path, exported: Path, state: dict) -> dict:
    rate = seconds_per_step(run_dir)
    return {
        "params": file_params(exported) or "",
        "file_kib": round(exported.stat().st_size / 1024, 1),
        "s_per_step": round(rate, 4) if rate is not None else "",
        "peak_rss_mib": state.get("peak_rss_mib") or "",
    }


def star_references(prompts: list[str], resolution: int, n: int = 64) -> torch.Tensor:
    """Real images of the concept prompts (random layouts, fixed seeds), [N, 3, R, R] in [-1, 1]: what CLIP-I
    and DINO compare the samples with."""
    from datamodules.shapes import parse_caption, render

    images = [
        render(*parse_caption(p), resolution, np.random.default_rng(i)) for i, p in enumerate(prompts[:n])
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def subject_references(concept, resolution: int, seed: int) -> torch.Tensor:
    """The concept's instance images, exactly as the run trained on them."""
    from datamodules.dreambooth import SubjectDataset

    data = SubjectDataset(
        concept, concept.instance_backgrounds, concept.num_instance_images, resolution, seed
    )
    return torch.stack([data[i]["image"] for i in range(len(data))])


class Scorer:
    """Scores in this process (one thread): the base is loaded once and its own scores are made once."""

    def __init__(self, args):
        self.args = args
        self.metrics = SubjectMetrics.from_paths(args.clip, args.dino) if (args.clip or args.dino) else None
        self.metric_names = self.metrics.names if self.metrics else []
        self.sampler = build_sampler("dpmpp_2m", steps=args.sampler_steps)
        self.evaluator = ShapesEvaluator()
        self.base_scores: dict[tuple, dict] = {}
        self._base = None

    step_exports = staticmethod(step_exports)

    def base(self):
        if self._base is None:
            self._base = load_for_sampling(str(self.args.base))
        return self._base

    def clip_metrics(self, images, prompts, references) -> dict:
        if self.metrics is None:
            return {}
        return {k: round(v, 5) for k, v in self.metrics.subject(images, prompts, references).items()}

    def star_prompts(self, split: str, n: int) -> list[str]:
        return cycled(fidelity.prompts_for(split, 10_000), n)

    def curve_point(self, path: Path) -> dict:
        """Concept fidelity of one adapter export (``--curve-n`` prompts)."""
        start = time.perf_counter()
        model = load_for_sampling(str(self.args.base), loras=[str(path)])
        result, _ = fidelity.score(
            model, self.star_prompts("concept", self.args.curve_n), self.sampler, None, SEED
        )
        return {"fidelity": result["fidelity"], "eval_s": round(time.perf_counter() - start, 1)}

    def final(self, arm, run_dir: Path, state: dict) -> dict:
        start = time.perf_counter()
        config, exported, _ = subject_fidelity.find_run_files(run_dir)
        row = self.star(exported) if arm.kind == "star" else self.subject(run_dir, config)
        return {**row, **run_costs(run_dir, exported, state), "eval_s": round(time.perf_counter() - start, 1)}

    def star(self, exported: Path) -> dict:
        """benchmarks/fidelity.py's scoring: the concept prompts (the star) and known prompts (drift)."""
        n = self.args.n or 90
        model = load_for_sampling(str(self.args.base), loras=[str(exported)])
        concept, known = self.star_prompts("concept", n), self.star_prompts("known", n)
        result, images = fidelity.score(model, concept, self.sampler, None, SEED)
        kept, _ = fidelity.score(model, known, self.sampler, None, SEED)
        if ("star", "known") not in self.base_scores:
            self.base_scores[("star", "known")], _ = fidelity.score(
                self.base(), known, self.sampler, None, SEED
            )
        references = star_references(concept, int(model.image_resolution)) if self.metrics else None
        return {
            "exact": result["fidelity"],
            "fidelity": result["fidelity"],
            "color": result["color_acc"],
            "shape": result["shape_acc"],
            "background": result["background_acc"],
            "known_fidelity": kept["fidelity"],
            "base_known_fidelity": self.base_scores[("star", "known")]["fidelity"],
            "n": n,
            **self.clip_metrics(images, concept, references),
        }

    def prompt_sets(self, concept, n: int) -> dict[str, list[str]]:
        return {
            "subject": subject_fidelity.subject_prompts(concept, n),
            "instance": subject_fidelity.instance_prompts(concept, n),
            "class": subject_fidelity.class_prompts(concept, n),
            "known": subject_fidelity.known_prompts(n),
        }

    def score_set(self, model, concept, kind: str, prompts: list[str]):
        images = subject_fidelity.generate(model, prompts, self.sampler, SUBJECT_GUIDANCE, SEED)
        return subject_fidelity.score_images(self.evaluator, concept, kind, images, prompts), images

    def subject(self, run_dir: Path, config: dict) -> dict:
        """benchmarks/subject_fidelity.py's scoring per concept (means over concepts; two concepts: each
        concept's subject rate too)."""
        n = self.args.n or 40
        models, concepts = subject_fidelity.load_models(run_dir, str(self.args.base))
        tuned = next(model for name, model in models.items() if name != "base")
        per_concept = []
        for concept in concepts:
            values = {}
            for kind, prompts in self.prompt_sets(concept, n).items():
                if not prompts:
                    continue
                row, images = self.score_set(tuned, concept, kind, prompts)
                key = (concept.identifier, kind)
                if key not in self.base_scores:
                    self.base_scores[key] = self.score_set(models["base"], concept, kind, prompts)[0]
                base = self.base_scores[key]
                values[f"{kind}_subject_rate"], values[f"base_{kind}_subject_rate"] = (
                    row["subject_rate"],
                    base["subject_rate"],
                )
                if kind == "subject":
                    values["background_acc"] = row["background_acc"]
                    references = None
                    if self.metrics:
                        seed = int(config["data"].get("seed", 0))
                        references = subject_references(concept, int(tuned.image_resolution), seed)
                    values.update(self.clip_metrics(images, prompts, references))
                elif kind == "instance":  # how often the caption as trained copies the instance background
                    values["instance_background"] = row["instance_background"]
                    values["base_instance_background"] = base["instance_background"]
                else:
                    values[f"{kind}_fidelity"], values[f"base_{kind}_fidelity"] = (
                        row["fidelity"],
                        base["fidelity"],
                    )
            per_concept.append((concept, values))
        row = {key: sum(v[key] for _, v in per_concept) / len(per_concept) for key in per_concept[0][1]}
        if len(per_concept) > 1:
            for concept, values in per_concept:
                row[f"subject_rate_{subject_fidelity.file_safe(concept.identifier)}"] = values[
                    "subject_subject_rate"
                ]
        return {"exact": row["subject_subject_rate"], **row, "n": n}
