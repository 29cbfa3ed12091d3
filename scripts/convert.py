"""Convert any base model to a Stable Diffusion single ``.safetensors`` file.

    python scripts/convert.py --base runwayml/stable-diffusion-v1-5 --out sd15.safetensors
    python scripts/convert.py --base logs/txt2img/runs/<run>/checkpoints/last.ckpt --out ours.safetensors
    python scripts/convert.py --base old-model.ckpt --out model.safetensors --fp32
    python scripts/convert.py --base sd15.safetensors --lora style.safetensors:0.8 \
        --lora subject.safetensors --out merged.safetensors
    python scripts/convert.py --base sd_xl_base_1.0.safetensors --diffusers --out sdxl-base/

``--base``: a single file (.safetensors / weights-only .ckpt), a diffusers folder, a hub id, or one of our
Lightning checkpoints. An SD v1/v2/XL-shaped model's output loads in AUTOMATIC1111, ComfyUI, kohya and
diffusers' ``from_single_file`` (SD v1 layout; SD 2.x files are written with the OpenCLIP text layout, SDXL
bases in sgm's SDXL layout); any other architecture (the embedded model, custom UNets) is written in the same
layout but loads only back here (``ldm.config`` metadata holds its exact architecture): those tools know the
released shapes only, and this script says so. ``--diffusers`` writes a diffusers model folder instead
(``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, float32 unless ``--fp16``). ``--lora``
(repeatable, ``file[:multiplier]``, kohya or diffusers/PEFT) bakes LoRA files into the weights first, the
merge users otherwise run kohya's scripts for; a token a LoRA file bundles (pivotal tuning) is written beside
``--out`` as ``<out name>_<token>.safetensors``. A fine-tuning run's checkpoint holds only its adapter: given
one, this says so and what to pass instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.io.diffusers_export import export_diffusers_folder
from ldm.io.lora_any import load_lora
from ldm.io.safe_load import safe_torch_load
from ldm.io.sd_presets import PRESETS
from ldm.io.single_file_export import export_components
from ldm.models.base_loader import load_base_model
from ldm.models.pipeline import tokenizer_before_loading
from ldm.utils.file_identity import describe_source
from ldm.utils.task import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="file, diffusers folder, hub id or our Lightning checkpoint")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--no-ema", action="store_true", help="take the raw instead of the EMA UNet weights")
    p.add_argument("--fp32", action="store_true", help="write float32 (default float16)")
    p.add_argument(
        "--diffusers",
        action="store_true",
        help="write a diffusers model folder at --out (UNet and VAE float32 unless --fp16)",
    )
    p.add_argument("--fp16", action="store_true", help="with --diffusers: UNet and VAE weights in float16")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="architecture of a single-file --base (default: detected)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file --base")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA .safetensors (kohya or PEFT) to bake in, optionally file:multiplier; repeatable",
    )
    args = p.parse_args(argv)
    for spec in args.lora:
        if not Path(split_lora(spec)[0]).is_file():
            p.error(f"--lora {spec}: no such file (give path.safetensors or path.safetensors:multiplier)")
    return args


def split_lora(spec: str) -> tuple[str, float]:
    """``file.safetensors[:0.8]`` -> (path, multiplier)."""
    path, sep, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def adapter_only_message(base: str) -> str | None:
    """What to do instead, when ``base`` is a fine-tuning checkpoint (it holds only the adapter); else
    None."""
    path = Path(base)
    if path.suffix not in (".ckpt", ".pt", ".pth") or not path.is_file():
        return None
    try:
        payload = safe_torch_load(path, mmap=True)
    except Exception:  # noqa: BLE001 - not ours; load_base_model gives the real error
        return None
    state = payload.get("state_dict", {}) if isinstance(payload, dict) else {}
    if "base" not in payload or not any(k.startswith("method.") for k in state):
        return None
    method = str(
        (payload.get("model_config") or {}).get("method", {}).get("_target_", "a fine-tuning method")
    )
    exported = sorted((path.parent.parent / "adapters").glob("*.safetensors"))
    adapter = str(exported[-1]) if exported else "<run>/adapters/<name>.safetensors"
    n = sum(k.startswith("method.") for k in state)
    return (
        f"{base} is a fine-tuning checkpoint: it holds only the adapter of {method.rsplit('.', 1)[-1]} "
        f"({n} tensors), trained on the base {payload['base']!r}, not a whole model. To write a merged "
        f"single file, pass the base and the exported adapter:\n  python scripts/convert.py --base "
        f"{payload['base']} --lora {adapter} --out merged.safetensors\n(to sample with it instead: python "
        f"sample.py --ckpt {base} --prompt ...)"
    )


def source_metadata(base: str) -> dict[str, str]:
    """``ldm.source`` (file/folder name or hub id) and ``ldm.source_sha256``: never the local path."""
    info = describe_source(base)
    hashed = {"ldm.source_sha256": info["sha256"]} if "sha256" in info else {}
    return {"ldm.source": info.get("name", ""), **hashed}


def main(argv=None) -> Path:
    args = parse_args(argv)
    message = adapter_only_message(args.base)
    if message:
        raise SystemExit(message)
    overrides = {"preset": args.preset, "tokenizer": args.tokenizer or tokenizer_before_loading(args.base)}
    components = load_base_model(args.base, use_ema=not args.no_ema, **overrides)
    for spec in args.lora:
        path, multiplier = split_lora(spec)
        summary = load_lora(
            path,
            unet=components.unet,
            text_encoders=components.text_encoders,
            multiplier=multiplier,
            merge=True,
        )
        print(f"baked in {summary['format']} LoRA {path} x{multiplier} ({summary['modules']} modules)")
    write_bundled_embeddings(args.lora, Path(args.out))
    if args.diffusers:
        out = export_diffusers_folder(components, args.out, dtype="float16" if args.fp16 else "float32")
        print(f"wrote {out} (a diffusers {components.version} folder)")
        return out
    out = export_components(
        components,
        args.out,
        dtype="float32" if args.fp32 else "float16",
        metadata={
            **source_metadata(args.base),
            "ldm.ema": str(not args.no_ema),
            **(
                {
                    "ldm.loras": ", ".join(
                        Path(split_lora(s)[0]).name + s[len(split_lora(s)[0]) :] for s in args.lora
                    )
                }
                if args.lora
                else {}
            ),
        },
    )
    print(f"wrote {out} (SD {components.version}, {components.parameterization}, {components.resolution} px)")
    if components.version == "custom":
        print(scope_note(out))
    return out


def write_bundled_embeddings(specs: list[str], out: Path) -> list[Path]:
    """A model file has no place for the textual-inversion tokens a --lora file bundles (pivotal tuning): each
    is written beside --out as ``<out name>_<token>.safetensors`` (SD 1.x/2.x: ``emb_params``; SDXL:
    ``clip_l`` / ``clip_g``), saying so in one line, so the baked model keeps its trigger word."""
    from ldm.io.bundled_embeddings import read_bundled_embeddings
    from ldm.io.embeddings import save_embedding
    from ldm.io.sdxl_embeddings import save_sdxl_embedding

    written = []
    for spec in specs:
        path = split_lora(spec)[0]
        for token, vectors in read_bundled_embeddings(path).items():
            target = out.parent / f"{out.stem}_{re.sub(r'[^A-Za-z0-9_-]+', '', token) or 'token'}.safetensors"
            meta = {"ldm.bundled_in": Path(path).name}
            if isinstance(vectors, tuple):
                save_sdxl_embedding(target, vectors, token, meta)
            else:
                save_embedding(target, vectors, token, "a1111", meta)
            print(
                f"note: {path} bundles the embedding {token}, which a model file cannot hold: wrote it to "
                f"{target} (sample.py --embedding {target}; AUTOMATIC1111 names it after the file)"
            )
            written.append(target)
    return written


def scope_note(out: Path) -> str:
    """What a file of an architecture other than the released SD v1/v2/XL ones is good for."""
    return (
        f"note: {out} is not an SD v1/v2/XL architecture: sample.py --ckpt and this project load it (its "
        "ldm.config metadata), but AUTOMATIC1111, ComfyUI, kohya and diffusers' from_single_file only "
        "know the released model shapes and will not"
    )


if __name__ == "__main__":
    run_main(main)
