"""Peak memory of loading an fp16 Stable Diffusion single file into float32 modules: ours
(``load_base_model``) vs the naive way (read the whole file, load it into the modules, then cast), side by
side, each in its own process (peak resident memory, ru_maxrss).

The file is SD v1.5's exact key layout and shapes (1.07 G parameters) with random fp16 values, written once
to ``--file`` (2.1 GB). The float32 weights alone take 4.3 GB: the ideal peak is that plus the interpreter.

    python benchmarks/load_memory.py                 # SD v1.5 layout (2.1 GB file, ~1-2 minutes)
    python benchmarks/load_memory.py --preset v2     # SD 2.x layout
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.task import child_failure, run_main


def write_file(path: Path, version: str) -> int:
    import torch
    from safetensors.torch import save_file

    from ldm.io.sd_layout import released_layout

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, meta in released_layout(version).items():
        if meta.dtype.is_floating_point:
            tensors[key] = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.float16)
        else:
            tensors[key] = torch.zeros(meta.shape, dtype=meta.dtype)
    save_file(tensors, str(path))
    return sum(t.numel() for t in tensors.values() if t.dtype.is_floating_point)


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with the released vocabulary size (49,408 ids), enough to load the text encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}</w>": i for i in range(49406)}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def load(way: str, path: str, version: str, tokenizer: str) -> dict:
    import torch

    if way == "ours":
        from ldm.models.base_loader import load_base_model

        parts = load_base_model(path, tokenizer=tokenizer, preset=version)
        modules = [parts.unet, parts.vae, parts.text_encoder]
    else:  # naive: whole file in memory, modules at full size, load, cast
        from safetensors.torch import load_file

        from ldm.io.openclip import openclip_to_hf
        from ldm.io.sd_keys import split_single_file
        from ldm.io.sd_presets import PRESETS
        from ldm.modules.text_encoder import CLIPTextEncoder
        from ldm.modules.unet import UNetModel
        from ldm.modules.vae import AutoencoderKL

        state = load_file(path)
        groups = split_single_file(state, path)
        preset = PRESETS[version]
        unet, vae = UNetModel(**preset["unet"]), AutoencoderKL(**preset["vae"])
        text = CLIPTextEncoder.from_config(preset["text_encoder"])
        unet.load_state_dict(groups["unet"])
        vae.load_state_dict(groups["vae"])
        layers = text.transformer.config.num_hidden_layers
        clip = openclip_to_hf(groups["openclip"], layers) if groups["openclip"] else groups["clip"]
        text.transformer.load_state_dict(clip)
        modules = [unet.float(), vae.float(), text.float()]
    floats = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    assert all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"way": way, "peak_gib": round(peak, 2), "float32_weights_gib": round(floats / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="v1", choices=("v1", "v2"))
    parser.add_argument("--file", help="where to write the fp16 file (default: a temporary folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file or Path(tmp) / f"sd-{args.preset}-fp16.safetensors")
        count = write_file(path, args.preset)
        write_tokenizer(Path(tmp) / "tokenizer")
        print(f"{path.name}: {count / 1e9:.2f} G parameters, {path.stat().st_size / 2**30:.2f} GiB on disk")
        rows = []
        for way in ("naive", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                way,
                str(path),
                args.preset,
                str(Path(tmp) / "tokenizer"),
            ]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise child_failure(way, result.stderr)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    naive, ours = rows
    print("| load into float32 | peak RSS | float32 weights |\n|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['peak_gib']:.2f} GiB | {row['float32_weights_gib']:.2f} GiB |")
    print(f"ours / naive peak: {ours['peak_gib'] / naive['peak_gib']:.2f}")


if __name__ == "__main__":
    run_main(main)
