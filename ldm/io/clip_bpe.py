"""CLIP's tokenizer without a download: the BPE merges file that the PyPI package ``open_clip_torch`` ships
(``open_clip/bpe_simple_vocab_16e6.txt.gz``, OpenAI's vocabulary) turned into a Hugging Face
``CLIPTokenizer`` with OpenAI's token ids ("a photo of a cat" -> 49406, 320, 1125, 539, 320, 2368, 49407).

The package is only located, never imported (importing it would pull torchvision), so
``pip install --no-deps open_clip_torch`` is enough.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from ldm.utils.files import atomic_write_text, cache_dir

__all__ = ["OPEN_CLIP_INSTALL_HINT", "clip_tokenizer_from_bpe", "open_clip_bpe_path"]

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses: vocabulary 49408 = 2 * 256 bytes + merges + 2 specials
OPEN_CLIP_INSTALL_HINT = "pip install --no-deps open_clip_torch (only its BPE vocabulary file is read)"


def open_clip_bpe_path() -> Path | None:
    """The BPE file of an installed ``open_clip_torch``, or None."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    return None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (CLIP's first 256 tokens, in this order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_tokenizer_from_bpe(
    bpe_path: str | Path, max_length: int = 77, pad_token: str | None = None
) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` from CLIP's gzipped merges file: vocab.json and merges.txt are written once to the
    cache (keyed by the file's content). ``pad_token``: SD 2.x pads with ``"!"``; v1 with
    ``<|endoftext|>``."""
    raw = Path(bpe_path).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    if len(lines) != N_MERGES:
        raise ValueError(f"{bpe_path}: {len(lines)} merges, CLIP's BPE file has {N_MERGES}")
    base = list(bytes_to_unicode().values())
    merged = ["".join(line.split()) for line in lines]
    vocab = [*base, *(token + "</w>" for token in base), *merged, "<|startoftext|>", "<|endoftext|>"]
    folder = cache_dir("clip-bpe", hashlib.sha256(raw).hexdigest()[:16])
    atomic_write_text(
        folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}), only_if_changed=True
    )
    atomic_write_text(
        folder / "merges.txt", "\n".join(["#version: 0.2", *lines]) + "\n", only_if_changed=True
    )
    options = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=max_length, local_files_only=True, **options
    )
