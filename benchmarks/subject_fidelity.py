"""Subject fidelity of a fine-tuning run on DreamBooth-style embedded data (``data=dreambooth``,
``data=named_object``), for every method: DreamBooth (full UNet or LoRA), textual inversion, hypernetworks.
Scored by the shapes evaluator.

    python benchmarks/subject_fidelity.py --run logs/dreambooth/runs/<run>
    python benchmarks/subject_fidelity.py --run logs/dreambooth_lora/runs/<run> --n 60 --grid-dir docs
    python benchmarks/subject_fidelity.py --run logs/textual_inversion/runs/<run>
    python benchmarks/subject_fidelity.py --run logs/hypernetwork/runs/<run>

For every concept of the run (its ``.hydra/config.yaml``):
  subject   the instance caption ("a sks square on a red background", "a <gem> on a red background") for
            backgrounds the instance images never had: the fraction of samples read as the subject (its shape
            in its colour(s)), and how often the background is right (the prompt's context is followed);
  instance  only when the instance captions do not name the background ("a sks square", images of one
            background): that caption as trained, read as the subject or not, and how often it is drawn on an
            instance image's background (copied from the training images: what masked loss should stop);
  class     ordinary prompts of the class ("a red square on a blue background", combinations the base was
            trained on): prompt fidelity (colour and shape right) and how often they are read as the subject
            (the paper's overfitting / language drift);
  known     ordinary prompts of every shape (what the rest of the model must keep doing);
each for the base and for the fine-tuned model: the run's exported file (``adapters/``): an SD single file
(``model/method=full``), a kohya LoRA merged into the base (``lora``), a textual-inversion embedding
(``textual_inversion``) or an AUTOMATIC1111 hypernetwork (``hypernetwork``) applied to the base.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.dreambooth import Concept
from datamodules.shapes import ShapesDataModule
from datamodules.shapes_evaluator import ShapesEvaluator
from ldm.diffusion import build_sampler
from ldm.io.safe_load import safe_torch_load
from ldm.models.pipeline import load_for_sampling
from ldm.utils.images import save_labelled_grid
from ldm.utils.task import run_main


def subject_prompts(concept: Concept, n: int) -> list[str]:
    backgrounds = concept.eval_backgrounds()
    return [concept.context_caption(backgrounds[i % len(backgrounds)]) for i in range(n)]


def instance_prompts(concept: Concept, n: int) -> list[str]:
    """The instance caption as trained, when it does not name the background ("a sks square" on images of one
    background, the case masked loss exists for): what the model now draws for it, and on which background.
    Empty when the captions name the background (the subject prompts then ask the same thing elsewhere)."""
    background = concept.instance_backgrounds[0]
    caption = concept.instance_caption(background)
    return [caption] * n if concept.subject and caption != concept.context_caption(background) else []


def file_safe(identifier: str) -> str:
    """ "<gem>" -> "gem": the identifier as a file-name part."""
    return re.sub(r"[^\w-]", "", identifier)


def background_of(prompt: str) -> str | None:
    found = re.search(r" on an? (\w+) background", prompt)
    return found.group(1) if found else None


def class_prompts(concept: Concept, n: int) -> list[str]:
    known = [p for p in ShapesDataModule(seed=0).prompts("train") if f" {concept.class_noun} on " in p]
    return [known[i % len(known)] for i in range(n)]


def known_prompts(n: int) -> list[str]:
    known = ShapesDataModule(seed=0).prompts("train")
    return [known[i % len(known)] for i in range(n)]


@torch.no_grad()
def generate(model, prompts: list[str], sampler, guidance: float | None, seed: int, batch: int = 32):
    return torch.cat(
        [
            model.generate(prompts[i : i + batch], guidance_scale=guidance, seed=seed + i, sampler=sampler)
            for i in range(0, len(prompts), batch)
        ]
    )


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def by_background(hits: list[bool], prompts: list[str]) -> dict[str, tuple[int, int]]:
    """{background: (samples read as the subject, samples)} in prompt order."""
    counts: dict[str, tuple[int, int]] = {}
    for hit, prompt in zip(hits, prompts):
        hit_count, total = counts.get(background_of(prompt), (0, 0))
        counts[background_of(prompt)] = (hit_count + int(hit), total + 1)
    return counts


def score_images(evaluator: ShapesEvaluator, concept: Concept, kind: str, images, prompts: list[str]) -> dict:
    """One prompt set's row: the share of samples read as the subject, prompt fidelity (not for subject
    prompts, which name no colour or shape), the share with the prompt's background (None for prompts that
    name none), per background, and the share drawn on one of the instance images' backgrounds."""
    named = kind in ("class", "known")
    fidelity = evaluator.score(images, prompts)["fidelity"] if named else None
    backgrounds = [evaluator.read(image)["background"] for image in images]
    hits = [evaluator.is_subject(image, concept.subject) for image in images]
    asked = [background_of(q) for q in prompts]
    right = sum(b == a for b, a in zip(backgrounds, asked)) / len(asked)
    return {
        "subject_rate": sum(hits) / len(hits),
        "fidelity": fidelity,
        "background_acc": None if None in asked else right,
        "instance_background": sum(b in concept.instance_backgrounds for b in backgrounds) / len(prompts),
        "n": len(prompts),
        "by_background": by_background(hits, prompts),
    }


METHODS = ("lora", "full", "textual_inversion", "hypernetwork")


def find_run_files(run: Path) -> tuple[dict, Path, str]:
    """(config, exported file, method name) of a fine-tuning run folder."""
    config = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)
    target = str(config["model"]["method"]["_target_"])
    method = next((m for m in METHODS if f".{m}." in target), None)
    if ".pivotal." in target:  # pivotal tuning's LoRA file bundles its token: applied as a LoRA
        method = "lora"
    if method is None:
        raise SystemExit(f"{run}: method {target} is not one of {METHODS}")
    exported = sorted(
        p
        for p in (run / "adapters").glob("*")
        if p.suffix in (".safetensors", ".pt") and "-step" not in p.name
    )
    if not exported:
        raise SystemExit(f"{run}/adapters has no exported file: did the run finish?")
    return config, exported[0], method


def base_of_run(run: Path, config: dict) -> str | None:
    """The run's model.base, or (found automatically: model.base=null) the base its last.ckpt records."""
    if config["model"].get("base"):
        return config["model"]["base"]
    last = run / "checkpoints" / "last.ckpt"
    return safe_torch_load(last, mmap=True).get("base") if last.is_file() else None


def load_models(run: Path, base: str | None):
    config, exported, method = find_run_files(run)
    base = base or base_of_run(run, config)
    if not base:
        raise SystemExit(
            f"{run}: neither its config (model.base) nor checkpoints/last.ckpt names the base: "
            "pass --base <the base checkpoint>"
        )
    models = {"base": load_for_sampling(base)}
    if method == "full":
        models[method] = load_for_sampling(str(exported), resolution=models["base"].image_resolution)
    else:
        if method == "textual_inversion":  # the token the run trained (the file alone: its file name)
            extra = {"embeddings": [f"{exported}:{config['model']['method']['placeholder']}"]}
        else:
            extra = {"lora": {"loras": [str(exported)]}, "hypernetwork": {"hypernetwork": str(exported)}}[
                method
            ]
        models[method] = load_for_sampling(base, **extra)
    concepts = [Concept.from_config(c) for c in config["data"]["concepts"]]
    return models, concepts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run",
        required=True,
        help="a dreambooth / dreambooth_lora / textual_inversion / hypernetwork run folder",
    )
    p.add_argument("--base", default=None, help="base model (default: the run's model.base)")
    p.add_argument("--n", type=int, default=40, help="samples per prompt set")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--guidance", type=float, default=3.0, help="CFG scale for every model (default 3, as trained)"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--grid-dir", default=None, help="save a grid per concept / prompt set / model here")
    p.add_argument("--tag", default="", help="prefix of the grid file names")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    run = Path(args.run)
    models, concepts = load_models(run, args.base)
    sampler, evaluator = build_sampler(args.sampler, steps=args.steps), ShapesEvaluator()
    results = {}
    for concept in concepts:
        prompt_sets = (
            ("subject", subject_prompts(concept, args.n)),
            ("instance", instance_prompts(concept, args.n)),
            ("class", class_prompts(concept, args.n)),
            ("known", known_prompts(args.n)),
        )
        for kind, prompts in (pair for pair in prompt_sets if pair[1]):
            for name, model in models.items():
                images = generate(model, prompts, sampler, args.guidance, args.seed)
                row = score_images(evaluator, concept, kind, images, prompts)
                fidelity = row["fidelity"]
                results[(concept.identifier, kind, name)] = row
                print(
                    f"{concept.identifier} {kind:7s} {name:10s} subject {row['subject_rate']:.3f} fidelity "
                    f"{fidelity if fidelity is None else round(fidelity, 3)} background "
                    f"{percent(row['background_acc'])} on an instance background "
                    f"{percent(row['instance_background'])}",
                    flush=True,
                )
                if kind == "subject":
                    print(
                        "    read as the subject, by background: "
                        + ", ".join(
                            f"{bg} {hit}/{total}" for bg, (hit, total) in row["by_background"].items()
                        ),
                        flush=True,
                    )
                if args.grid_dir:
                    save_labelled_grid(
                        images[:12],
                        prompts[:12],
                        Path(args.grid_dir) / f"{args.tag}{file_safe(concept.identifier)}_{kind}_{name}.png",
                    )
    print(
        "\n| concept | prompts | model | read as the subject | prompt fidelity (colour+shape) | background "
        "asked for | on an instance background | n |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (identifier, kind, name), r in results.items():
        print(
            f"| {identifier} | {kind} | {name} | {r['subject_rate']:.1%} | {percent(r['fidelity'])} | "
            f"{percent(r['background_acc'])} | {percent(r['instance_background'])} | {r['n']} |"
        )
    return results


if __name__ == "__main__":
    run_main(main)
