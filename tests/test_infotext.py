"""PNG Info like AUTOMATIC1111's (issue 27): the ``parameters`` chunk carries the checkpoint's ``Model hash``
and every adapter with its hash and multiplier, and reads back under A1111's own parsing rules."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from PIL import Image

import sample
from ldm.io.infotext import addnet_hash, quote
from tests.test_sample_cli import single_file  # noqa: F401 - pytest fixture (a tiny SD single file)

# A1111's infotext rule: the last line is `Key: value` pairs separated by commas; a value may be a JSON string
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) the way AUTOMATIC1111's PNG Info reads a ``parameters`` chunk."""
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in PARAM.findall(last):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt), "\n".join(negative), fields


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def adapters(single_file: Path, folder: Path) -> tuple[Path, Path, Path]:  # noqa: F811
    """A kohya LoRA, an embedding and a hypernetwork for the tiny single file."""
    from ldm.io.embeddings import save_embedding
    from ldm.io.hypernetwork_file import save_hypernetwork
    from ldm.io.kohya_lora import save_kohya_lora
    from ldm.models.base_loader import load_base_model
    from ldm.modules.adapters.hypernetwork import Hypernetwork
    from ldm.modules.adapters.lora import inject_lora

    components = load_base_model(single_file)
    torch.manual_seed(3)
    for layer in inject_lora(components.unet, ["*attn1.to_k"], rank=2, alpha=1.0).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.5)
    lora = save_kohya_lora(folder / "style_v2.safetensors", components.unet, None)
    width = components.text_encoder.transformer.config.hidden_size
    embedding = save_embedding(folder / "my-star.safetensors", torch.randn(2, width), "<star>")
    hypernetwork = save_hypernetwork(folder / "anime.pt", Hypernetwork([width]), name="anime")
    return lora, embedding, hypernetwork


def test_png_info_names_the_model_and_every_adapter(single_file, tmp_path):  # noqa: F811
    lora, embedding, hypernetwork = adapters(single_file, tmp_path)
    sample.main(
        [
            "--ckpt",
            str(single_file),
            "--prompt",
            "a red my-star, on a blue background",
            "--negative-prompt",
            "blurry",
            "--lora",
            f"{lora}:0.8",
            "--embedding",
            str(embedding),
            "--hypernetwork",
            f"{hypernetwork}:0.7",
            "--n",
            "1",
            "--steps",
            "2",
            "--sampler",
            "euler_a",
            "--seed",
            "9",
            "--resolution",
            "16",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    png = next((tmp_path / "out").glob("000_*.png"))
    prompt, negative, fields = parse_infotext(Image.open(png).text["parameters"])
    assert prompt == "a red my-star, on a blue background <lora:style_v2:0.8> <hypernet:anime:0.7>"
    assert negative == "blurry"
    assert fields["Model hash"] == sha256(single_file)[:10] and fields["Model"] == single_file.stem
    assert (fields["Steps"], fields["Sampler"], fields["Seed"], fields["Size"]) == (
        "2",
        "Euler a",
        "9",
        "16x16",
    )
    # A1111's LoRA hash: SHA-256 of the tensor bytes after the safetensors header, 12 digits
    header = int.from_bytes(lora.read_bytes()[:8], "little")
    assert addnet_hash(lora) == hashlib.sha256(lora.read_bytes()[8 + header :]).hexdigest()
    assert fields["Lora hashes"] == f"style_v2: {addnet_hash(lora)[:12]}"
    assert fields["TI hashes"] == f"my-star: {sha256(embedding)[:12]}"
    assert fields["Hypernet"] == "anime" and fields["Hypernet hash"] == sha256(hypernetwork)[:10]
    assert fields["Hypernet strength"] == "0.7"


def test_quote_as_a1111():
    assert quote("plain") == "plain"
    assert quote("a: b, c") == '"a: b, c"' and quote('say "hi", ok') == '"say \\"hi\\", ok"'
    _, _, fields = parse_infotext(f"p\nSteps: 2, Lora hashes: {quote('a: 1, b: 2')}, Seed: 3")
    assert fields == {"Steps": "2", "Lora hashes": "a: 1, b: 2", "Seed": "3"}
