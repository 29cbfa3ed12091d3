"""LoRA tools (what kohya's resize_lora.py and extract_lora_from_models.py do), by truncated SVD:

    python scripts/lora_tools.py resize --lora big.safetensors --rank 8 --out small.safetensors
    python scripts/lora_tools.py resize --lora big.safetensors --energy 0.9 --out small.safetensors
    python scripts/lora_tools.py extract --base sd15.safetensors --tuned dreambooth.safetensors --rank 32 \\
        --out extracted.safetensors

``resize``: a kohya LoRA / LoCon file at a lower rank per module (``--rank``, or ``--energy``: the smallest
rank keeping that fraction of each module's ``||delta||_F^2``; both: the smaller). ``extract``: the LoRA
closest to ``tuned - base`` (two models ``load_base_model`` reads: single files, diffusers folders, our
checkpoints; e.g. a DreamBooth run's exported file vs its base) on the UNet's transformer layers
(``--conv-rank`` adds the 3x3 convolutions, ``--text-encoder`` the text encoder's attention and MLP). Both
write kohya files and print how much of the difference each rank keeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.io.lora_tools import extract_lora, resize_lora_file
from ldm.models.base_loader import load_base_model
from ldm.models.finetune.lora import PRESETS
from ldm.utils.task import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    resize = sub.add_parser("resize", help="a LoRA file at a lower rank")
    resize.add_argument("--lora", required=True, help="kohya LoRA / LoCon .safetensors")
    extract = sub.add_parser("extract", help="a LoRA from a full fine-tune vs its base")
    extract.add_argument("--base", required=True, help="the base model (file, folder, hub id or checkpoint)")
    extract.add_argument("--tuned", required=True, help="the fully fine-tuned model, in any of those forms")
    extract.add_argument(
        "--conv-rank", type=int, default=None, help="also the 3x3 convolutions, at this rank"
    )
    extract.add_argument(
        "--text-encoder", action="store_true", help="also the text encoder (when it changed)"
    )
    for parser in (resize, extract):
        parser.add_argument("--out", required=True, help="output .safetensors")
        parser.add_argument("--rank", type=int, default=None, help="the rank to keep per module")
        parser.add_argument("--energy", type=float, default=None, help="the fraction of ||delta||^2 to keep")
    args = p.parse_args(argv)
    if args.rank is None and args.energy is None:
        p.error("give --rank and/or --energy")
    if args.rank is not None and args.rank < 1:
        p.error(f"--rank must be >= 1, got {args.rank}")
    if args.energy is not None and not 0 < args.energy <= 1:
        p.error(f"--energy must be in (0, 1], got {args.energy}")
    if args.command == "resize" and not Path(args.lora).is_file():
        p.error(f"--lora {args.lora}: no such file")
    return args


def print_report(report: dict, out: Path) -> None:
    ranks = sorted(set(report["ranks"].values()))
    print(f"wrote {out}: {report['modules']} modules, rank {ranks[0] if len(ranks) == 1 else ranks}")
    print(f"kept {report['total_kept']:.2%} of the difference (sum of ||delta||_F^2 over the modules)")
    worst = min(report["kept"], key=report["kept"].get)
    print(f"least kept: {worst} {report['kept'][worst]:.2%}")
    print("rank -> kept: " + ", ".join(f"{r}: {k:.1%}" for r, k in report["kept_at_rank"].items()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.command == "resize":
        report = resize_lora_file(args.lora, out, rank=args.rank, energy=args.energy)
    else:
        base, tuned = load_base_model(args.base), load_base_model(args.tuned)
        unet_targets = list(PRESETS["UNET_TRANSFORMER"]) + (
            list(PRESETS["UNET_CONV"]) if args.conv_rank else []
        )
        targets = {
            "unet": unet_targets,
            "text_encoder": PRESETS["TEXT_ENCODER_ALL"] if args.text_encoder else (),
        }
        report = extract_lora(
            out,
            {"unet": base.unet, "text_encoder": base.text_encoder},
            {"unet": tuned.unet, "text_encoder": tuned.text_encoder},
            targets,
            rank=args.rank,
            energy=args.energy,
            conv_rank=args.conv_rank,
            metadata={"ss_sd_model_name": Path(args.base).name},
        )
    print_report(report, out)
    return report


if __name__ == "__main__":
    run_main(main)
