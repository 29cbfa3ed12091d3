"""Subject fidelity and prior preservation of a DreamBooth run on the embedded subject, scored by the shapes
evaluator.

    python benchmarks/dreambooth_fidelity.py --run logs/dreambooth/runs/<run>
    python benchmarks/dreambooth_fidelity.py --run logs/dreambooth_lora/runs/<run> --n 60 --grid-dir docs

For every concept of the run (its ``.hydra/config.yaml``):
  subject   "a <identifier> <class> on a <background> background" for backgrounds the instance images never
            had: the fraction of samples read as the subject (its shape in its two colour halves), and how
            often the background is right (the prompt's context is followed);
  class     ordinary prompts of the class ("a red square on a blue background", combinations the base was
            trained on): prompt fidelity (colour and shape right) and how often they are read as the subject
            (the paper's overfitting / language drift), for the base and for the fine-tuned model.
The fine-tuned model is the run's exported file (``adapters/*.safetensors``: an SD single file for
``model/method=full``, a kohya LoRA merged into the base for ``model/method=lora``).
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
from datamodules.shapes import ShapesDataModule, caption_for
from datamodules.shapes_evaluator import ShapesEvaluator
from ldm.diffusion import build_sampler
from ldm.io.safe_load import safe_torch_load
from ldm.utils.images import save_labelled_grid
from sample import load_for_sampling


def subject_prompts(concept: Concept, n: int) -> list[str]:
    backgrounds = concept.eval_backgrounds()
    return [caption_for(concept.identifier, concept.class_noun, backgrounds[i % len(backgrounds)]) for i in range(n)]


def background_of(prompt: str) -> str:
    return re.search(r" on an? (\w+) background", prompt).group(1)


def class_prompts(concept: Concept, n: int) -> list[str]:
    known = [p for p in ShapesDataModule(seed=0).prompts("train") if f" {concept.class_noun} on " in p]
    return [known[i % len(known)] for i in range(n)]


@torch.no_grad()
def generate(model, prompts: list[str], sampler, guidance: float | None, seed: int, batch: int = 32):
    return torch.cat([model.generate(prompts[i:i + batch], guidance_scale=guidance, seed=seed + i, sampler=sampler)
                      for i in range(0, len(prompts), batch)])


def find_run_files(run: Path) -> tuple[dict, Path, bool]:
    """(config, exported file, is_lora) of a DreamBooth run folder."""
    config = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)
    exported = sorted(p for p in (run / "adapters").glob("*.safetensors") if "-step" not in p.name)
    if not exported:
        raise SystemExit(f"{run}/adapters has no exported .safetensors: did the run finish?")
    is_lora = "lora" in str(config["model"]["method"]["_target_"]).lower()
    return config, exported[0], is_lora


def base_of_run(run: Path, config: dict) -> str | None:
    """The run's model.base, or (found automatically: model.base=null) the base its last.ckpt records."""
    if config["model"].get("base"):
        return config["model"]["base"]
    last = run / "checkpoints" / "last.ckpt"
    return safe_torch_load(last, mmap=True).get("base") if last.is_file() else None


def load_models(run: Path, base: str | None):
    config, exported, is_lora = find_run_files(run)
    base = base or base_of_run(run, config)
    if not base:
        raise SystemExit(f"{run}: neither its config (model.base) nor checkpoints/last.ckpt names the base: "
                         "pass --base <the base checkpoint>")
    models = {"base": load_for_sampling(base)}
    models["dreambooth"] = load_for_sampling(base, loras=[str(exported)]) if is_lora else load_for_sampling(
        str(exported), resolution=models["base"].image_resolution)
    concepts = [Concept.from_config(c) for c in config["data"]["concepts"]]
    return models, concepts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a dreambooth / dreambooth_lora run folder")
    p.add_argument("--base", default=None, help="base model (default: the run's model.base)")
    p.add_argument("--n", type=int, default=40, help="samples per prompt set")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale for every model (default 3, as trained)")
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
        for kind, prompts in (("subject", subject_prompts(concept, args.n)), ("class", class_prompts(concept, args.n))):
            for name, model in models.items():
                images = generate(model, prompts, sampler, args.guidance, args.seed)
                fidelity = evaluator.score(images, prompts)["fidelity"] if kind == "class" else None
                backgrounds = [evaluator.read(image)["background"] for image in images]
                row = {"subject_rate": evaluator.subject_rate(images, concept.subject), "fidelity": fidelity,
                       "background_acc": sum(b == background_of(q) for b, q in zip(backgrounds, prompts)) / len(prompts),
                       "n": len(prompts)}
                results[(concept.identifier, kind, name)] = row
                print(f"{concept.identifier} {kind:7s} {name:10s} subject {row['subject_rate']:.3f} fidelity "
                      f"{fidelity if fidelity is None else round(fidelity, 3)} background {row['background_acc']:.3f}",
                      flush=True)
                if args.grid_dir:
                    save_labelled_grid(images[:12], prompts[:12], Path(args.grid_dir) /
                                       f"{args.tag}{concept.identifier}_{kind}_{name}.png")
    print("\n| concept | prompts | model | read as the subject | class fidelity (colour+shape) | background | n |")
    print("|---|---|---|---|---|---|---|")
    for (identifier, kind, name), r in results.items():
        fidelity = f"{r['fidelity']:.1%}" if kind == "class" else "-"
        print(f"| {identifier} | {kind} | {name} | {r['subject_rate']:.1%} | {fidelity} | {r['background_acc']:.1%} "
              f"| {r['n']} |")
    return results


if __name__ == "__main__":
    main()
