"""Convert any base model to a Stable Diffusion single ``.safetensors`` file.

    python scripts/convert.py --base runwayml/stable-diffusion-v1-5 --out sd15.safetensors
    python scripts/convert.py --base logs/txt2img/runs/<run>/checkpoints/last.ckpt --out ours.safetensors
    python scripts/convert.py --base old-model.ckpt --out model.safetensors --fp32

``--base``: a single file (.safetensors / weights-only .ckpt), a diffusers folder, a hub id, or one of our
Lightning checkpoints. The output loads in AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file``
(SD v1 layout; SD 2.x files are written with the OpenCLIP text layout), and back here with its exact
architecture (``ldm.config`` metadata).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.io.sd_presets import PRESETS
from ldm.io.single_file_export import export_components
from ldm.models.base_loader import load_base_model
from ldm.utils.file_identity import describe_source


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="file, diffusers folder, hub id or our Lightning checkpoint")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--no-ema", action="store_true", help="take the raw instead of the EMA UNet weights")
    p.add_argument("--fp32", action="store_true", help="write float32 (default float16)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="architecture of a single-file --base (default: detected)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file --base")
    return p.parse_args(argv)


def source_metadata(base: str) -> dict[str, str]:
    """``ldm.source`` (file/folder name or hub id) and ``ldm.source_sha256``: never the local path."""
    info = describe_source(base)
    hashed = {"ldm.source_sha256": info["sha256"]} if "sha256" in info else {}
    return {"ldm.source": info.get("name", ""), **hashed}


def main(argv=None) -> Path:
    args = parse_args(argv)
    overrides = {"preset": args.preset, "tokenizer": args.tokenizer}
    components = load_base_model(args.base, use_ema=not args.no_ema, **overrides)
    out = export_components(
        components,
        args.out,
        dtype="float32" if args.fp32 else "float16",
        metadata={**source_metadata(args.base), "ldm.ema": str(not args.no_ema)},
    )
    print(f"wrote {out} (SD {components.version}, {components.parameterization}, {components.resolution} px)")
    return out


if __name__ == "__main__":
    main()
