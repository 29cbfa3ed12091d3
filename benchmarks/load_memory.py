"""Peak memory of loading an fp16 Stable Diffusion single file into float32 modules: ours
(``load_base_model``) vs the naive way (read the whole file, load it into the modules, then cast), side by
side, each in its own process (peak resident memory, ru_maxrss).

The file is SD v1.5's exact key layout and shapes (1.07 G parameters) with random fp16 values, written once
to ``--file`` (2.1 GB). The float32 weights alone take 4.3 GB: the ideal peak is that plus the interpreter.

    python benchmarks/load_memory.py                 # SD v1.5 layout (2.1 GB file, ~1-2 minutes)
    python benchmarks/load_memory.py --preset v2     # SD 2.x layout
    python benchmarks/load_memory.py --preset sdxl --unet-channels 64 --text-layers 8   # SDXL, narrowed

``--preset sdxl`` is SDXL base 1.0's layout (CLIP-L + OpenCLIP bigG in sgm's names, 3.5 G parameters at full
size). ``--unet-channels`` narrows the UNet (``model_channels``) and ``--text-layers`` shortens the text
encoders (``num_hidden_layers``, both), keeping every name and every other shape, so both loads fit a small
machine.
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


def preset_of(version: str, unet_channels: int | None, text_layers: int | None) -> dict:
    from ldm.io.sd_presets import resolve_preset

    text = {"num_hidden_layers": text_layers} if text_layers else None
    return resolve_preset(
        version,
        unet={"model_channels": unet_channels} if unet_channels else None,
        text_encoder=text,
        text_encoder_2=text if version == "sdxl" else None,
    )


def write_file(
    path: Path, version: str, unet_channels: int | None = None, text_layers: int | None = None
) -> int:
    import torch
    from safetensors.torch import save_file

    from ldm.io.sd_layout import released_layout

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, meta in released_layout(version, preset_of(version, unet_channels, text_layers)).items():
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


def load(way: str, path: str, version: str, tokenizer: str, unet_channels: str, text_layers: str) -> dict:
    import torch

    preset = preset_of(version, int(unet_channels) or None, int(text_layers) or None)
    if way == "ours":
        from ldm.models.base_loader import load_base_model

        parts = load_base_model(path, tokenizer=tokenizer, preset=preset)
        modules = [parts.unet, parts.vae, *parts.text_encoders]
    else:  # naive: whole file in memory, modules at full size, load, cast
        from safetensors.torch import load_file

        from ldm.io.openclip import openclip_to_hf, openclip_to_hf_projected
        from ldm.io.sd_keys import split_single_file
        from ldm.modules.text_encoder import CLIPTextEncoder
        from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
        from ldm.modules.unet import UNetModel
        from ldm.modules.vae import AutoencoderKL

        state = load_file(path)
        groups = split_single_file(state, path)
        unet, vae = UNetModel(**preset["unet"]), AutoencoderKL(**preset["vae"])
        text = CLIPTextEncoder.from_config(preset["text_encoder"])
        unet.load_state_dict(groups["unet"])
        vae.load_state_dict(groups["vae"])
        layers = text.transformer.config.num_hidden_layers
        clip = openclip_to_hf(groups["openclip"], layers) if groups["openclip"] else groups["clip"]
        text.transformer.load_state_dict(clip)
        modules = [unet.float(), vae.float(), text.float()]
        if "text_encoder_2" in preset:
            text_2 = PooledCLIPTextEncoder.from_config(preset["text_encoder_2"])
            layers_2 = text_2.transformer.config.num_hidden_layers
            text_2.transformer.load_state_dict(openclip_to_hf_projected(groups["clip_g"], layers_2))
            modules.append(text_2.float())
    floats = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    assert all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"way": way, "peak_gib": round(peak, 2), "float32_weights_gib": round(floats / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="v1", choices=("v1", "v2", "sdxl"))
    parser.add_argument(
        "--unet-channels", type=int, default=0, help="the UNet's model_channels (default: the released)"
    )
    parser.add_argument(
        "--text-layers", type=int, default=0, help="the text encoders' layers (default: the released)"
    )
    parser.add_argument("--file", help="where to write the fp16 file (default: a temporary folder)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file or Path(tmp) / f"sd-{args.preset}-fp16.safetensors")
        count = write_file(path, args.preset, args.unet_channels or None, args.text_layers or None)
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
                str(args.unet_channels),
                str(args.text_layers),
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
