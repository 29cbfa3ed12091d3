"""What a fine-tune learned and what it kept: CLIP-T, CLIP-I and DINO (and PRES, DIV) of the base and of the
base + method, per prompt group, as the DreamBooth paper measures them (docs/evaluation.md).

    python scripts/evaluate.py --run logs/dreambooth/runs/<run> --clip <clip folder> --dino <dino folder>
    python scripts/evaluate.py --ckpt v1-5.safetensors --lora dog.safetensors --references /data/dog \\
        --subject-prompt "a sks dog on the beach" --class-prompt "a dog" \\
        --clip /models/clip --dino /models/dino

A run folder gives the base (its model.base, or the base its last.ckpt records), the method's exported file
(``adapters/``: a LoRA, an embedding, a hypernetwork or, for a full fine-tune, a single file), the subject's
reference images (its training images that are not class images) and the prompt groups:

  subject  prompts naming the subject (the run's log prompts that contain the identifier / placeholder, or
           the embedded concept's captions on the backgrounds it never trained on): CLIP-T, CLIP-I, DINO, DIV;
  class    the concept's class prompts: CLIP-T, and PRES (DINO of class samples vs the subject: lower = the
           class still looks like the class);
  other    the run's other log prompts (what the model must keep doing): CLIP-T.

Flags replace what the run gives (``--ckpt``: the base; ``--lora`` / ``--embedding`` / ``--hypernetwork`` /
``--tuned``: the method). Writes ``evaluation.md`` (the table), ``evaluation.json`` and ``grid.png`` (the
first samples of each group, base above base + method) into ``--out`` (default ``<run>/evaluation``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.subject_metrics import reference_images
from ldm.diffusion import build_sampler
from ldm.io.safe_load import safe_torch_load
from ldm.models.pipeline import generate_batches, load_for_sampling
from ldm.modules.subject_metrics import SubjectMetrics
from ldm.utils.files import atomic_write_text
from ldm.utils.images import save_labelled_grid
from ldm.utils.task import run_main

METHOD_FLAGS = {
    "lora": "lora",
    "textual_inversion": "embedding",
    "hypernetwork": "hypernetwork",
    "full": "tuned",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a fine-tuning run folder (logs/<task>/runs/<run>)")
    p.add_argument("--ckpt", help="the base model (default: the run's)")
    p.add_argument("--lora", action="append", default=[], help="LoRA file[:multiplier] (repeatable)")
    p.add_argument("--embedding", action="append", default=[], help="embedding file[:token] (repeatable)")
    p.add_argument("--hypernetwork", help="hypernetwork file[:strength]")
    p.add_argument("--tuned", help="a fully fine-tuned model (DreamBooth's single file)")
    p.add_argument("--clip", help="local CLIPModel folder (with its processor): CLIP-T, CLIP-I")
    p.add_argument("--dino", help="local DINO / DINOv2 ViT folder (with its image processor): DINO, PRES")
    p.add_argument("--lpips-vgg", help="torchvision vgg16 state dict, with --lpips-lin: DIV")
    p.add_argument("--lpips-lin", help="the lpips package's weights/v0.1/vgg.pth")
    p.add_argument("--references", help="folder of the subject's images (default: the run's training images)")
    p.add_argument(
        "--subject-match",
        help="subject prompts are the prompts containing this (default: the run's identifier / placeholder)",
    )
    for group in ("subject", "class", "other"):
        p.add_argument(
            f"--{group}-prompt", action="append", default=[], help=f"a {group} prompt (repeatable)"
        )
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default <run>/evaluation)")
    return p.parse_args(argv)


def run_config(run: Path) -> dict:
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--run {run}: no .hydra/config.yaml there; pass a fine-tuning run folder")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    config.setdefault("paths", {}).update(output_dir=str(run), work_dir=str(Path.cwd()))  # no Hydra runtime
    return config


def run_method(run: Path, config: dict) -> dict[str, list[str] | str]:
    """The method's file of a run, as the ``load_for_sampling`` argument it goes into."""
    target = str(config["model"].get("method", {}).get("_target_", ""))
    method = next((m for m in METHOD_FLAGS if f".{m}." in target), None)
    if method is None:
        raise ValueError(f"--run {run}: method {target or '(none)'} is not one of {list(METHOD_FLAGS)}")
    exported = sorted(
        p
        for p in (run / "adapters").glob("*")
        if p.suffix in (".safetensors", ".pt") and "-step" not in p.name
    )
    if not exported:
        raise FileNotFoundError(f"{run}/adapters has no exported file: did the run finish?")
    flag = METHOD_FLAGS[method]
    return {flag: [str(exported[0])] if flag in ("lora", "embedding") else str(exported[0])}


def run_base(run: Path, config: dict) -> str:
    base = config["model"].get("base")
    last = run / "checkpoints" / "last.ckpt"
    if not base and last.is_file():
        base = safe_torch_load(last, mmap=True).get("base")
    if not base:
        raise ValueError(
            f"--run {run}: neither model.base nor checkpoints/last.ckpt names the base: pass --ckpt"
        )
    return str(base)


def load_models(args, config: dict | None) -> dict:
    """{"base": model, "tuned": model} ready to sample."""
    run = Path(args.run) if args.run else None
    method = {k: getattr(args, k) for k in METHOD_FLAGS.values() if getattr(args, k)}
    if not method:
        if run is None:
            raise ValueError("give --run, or --ckpt with --lora / --embedding / --hypernetwork / --tuned")
        method = run_method(run, config)
    base = args.ckpt or (run_base(run, config) if run else None)
    if not base:
        raise ValueError("--ckpt is required without --run: the base model to compare against")
    models = {"base": load_for_sampling(base)}
    if "tuned" in method:
        models["tuned"] = load_for_sampling(method["tuned"], resolution=models["base"].image_resolution)
    else:
        models["tuned"] = load_for_sampling(
            base,
            loras=method.get("lora", []),
            embeddings=method.get("embedding", []),
            hypernetwork=method.get("hypernetwork"),
        )
    return models


def subject_word(args, config: dict | None) -> str | None:
    if args.subject_match or config is None:
        return args.subject_match
    concepts = config.get("data", {}).get("concepts") or []
    if concepts:
        return concepts[0].get("identifier", "sks")
    return config["model"].get("method", {}).get("placeholder")


def prompt_groups(args, config: dict | None) -> dict[str, list[str]]:
    """{"subject", "class", "other": prompts}, the flags' first, else the run's; empty groups left out."""
    from datamodules.dreambooth import Concept

    word = subject_word(args, config)
    logged = list(config["model"].get("log_prompts") or []) if config else []
    concepts = [Concept.from_config(c) for c in (config or {}).get("data", {}).get("concepts") or []]
    subject = [p for p in logged if word is None or word in p]
    if not subject and concepts:
        subject = [c.context_caption(b) for c in concepts for b in c.eval_backgrounds()]
    groups = {
        "subject": args.subject_prompt or subject,
        "class": args.class_prompt or [p for c in concepts for p in c.class_prompts()],
        "other": args.other_prompt or [p for p in logged if word is not None and word not in p],
    }
    return {name: prompts for name, prompts in groups.items() if prompts}


def load_references(args, config: dict | None) -> torch.Tensor | None:
    """The subject's images [N, 3, R, R] in [-1, 1]: ``--references`` or the run's training images."""
    if args.references:
        from datamodules.image_folder import ImageFolderDataModule

        folder = ImageFolderDataModule(
            root=args.references, resolution=256, val_size=0, random_flip=0.0, bucketing=False
        )
        folder.setup("fit")
        return reference_images(folder, 64)
    if config is None:
        return None
    import hydra

    data = hydra.utils.instantiate(OmegaConf.create(config)["data"])
    data.setup("fit")
    return reference_images(data, 64)


def sample(model, sampler, prompts: list[str], args) -> torch.Tensor:
    batches = generate_batches(
        model, sampler, prompts, n=args.n, guidance=args.guidance, seed=args.seed, progress=False
    )
    return torch.cat([batch.images for batch in batches])


def measure(metrics: SubjectMetrics, group: str, images, prompts, references, n: int) -> dict[str, float]:
    values = metrics.subject(images, prompts, references if group == "subject" else None)
    if group == "class" and references is not None and metrics.dino_model is not None:
        values["pres"] = metrics.pres(images, references)
    if group == "subject" and metrics.lpips is not None and n > 1:
        values["div"] = sum(metrics.div(images[i : i + n]) for i in range(0, len(images), n)) / (
            len(images) // n
        )
    return values


COLUMNS = ("clip_t", "clip_i", "dino", "pres", "div")


def table(results: dict) -> str:
    lines = ["| prompts | model | " + " | ".join(COLUMNS) + " | samples |", "|---" * (len(COLUMNS) + 3) + "|"]
    for (group, name), row in results.items():
        cells = [f"{row[c]:.4f}" if c in row else "-" for c in COLUMNS]
        lines.append(f"| {group} | {name} | " + " | ".join(cells) + f" | {row['samples']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.clip and not args.dino:
        raise ValueError("give --clip and/or --dino: local model folders (docs/evaluation.md)")
    config = run_config(Path(args.run)) if args.run else None
    metrics = SubjectMetrics.from_paths(args.clip, args.dino)
    if args.lpips_vgg or args.lpips_lin:
        from ldm.modules.lpips import LPIPS

        metrics.lpips = LPIPS.from_files(args.lpips_vgg, args.lpips_lin)
    groups, references = prompt_groups(args, config), load_references(args, config)
    if not groups:
        raise ValueError("no prompts: give --subject-prompt / --class-prompt / --other-prompt")
    models, sampler = load_models(args, config), build_sampler(args.sampler, steps=args.steps)
    out = Path(args.out or (Path(args.run) / "evaluation" if args.run else "evaluation"))
    results, shown, labels = {}, [], []
    for group, prompts in groups.items():
        for name, model in models.items():
            images = sample(model, sampler, prompts, args)
            repeated = [p for p in prompts for _ in range(args.n)]
            row = measure(metrics, group, images, repeated, references, args.n)
            results[(group, name)] = {**row, "samples": len(images)}
            shown.append(images[:4])
            labels += [f"{name}: {p}" for p in repeated[:4]]
            print(f"{group:7s} {name:5s} " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    text = table(results)
    print("\n" + text)
    atomic_write_text(out / "evaluation.md", text)
    rows = [{"prompts": g, "model": m, **row} for (g, m), row in results.items()]
    atomic_write_text(out / "evaluation.json", json.dumps({"groups": groups, "results": rows}, indent=1))
    save_labelled_grid(torch.cat(shown), labels, out / "grid.png", ncol=4)
    print(f"wrote {out}/evaluation.md, evaluation.json, grid.png")
    return results


if __name__ == "__main__":
    run_main(main)
