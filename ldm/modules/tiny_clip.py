"""A tiny offline CLIP tokenizer and seeded weights, for the embedded demo and tests.

``write_tiny_clip_tokenizer`` writes a small byte-level CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``)
whose whole-word tokens cover the embedded shapes dataset; ``tiny_clip_tokenizer`` caches and loads it;
``init_weights_seeded`` initialises a model from a fixed seed, the same on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.utils.files import atomic_write_text, cache_dir

__all__ = [
    "TINY_DATASET_WORDS",
    "TINY_PROMPT_WORDS",
    "init_weights_seeded",
    "normalise_words",
    "tiny_clip_model",
    "tiny_clip_tokenizer",
    "write_tiny_clip_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
_TINY_TOKENIZER_FORMAT = "tiny-clip-bpe-v1"  # bump when the tokenizer file layout changes

# Words of the embedded shapes dataset (colours, shapes, caption glue) and DreamBooth-style identifiers.
TINY_DATASET_WORDS: tuple[str, ...] = (
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta",
    "white", "black", "gray", "brown",
    # shapes
    "circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring",
    # caption glue
    "a", "an", "on", "the", "background", "of", "photo", "with", "and", "in",
    # identifier-like tokens (DreamBooth "a sks circle")
    "sks", "xyz",
)  # fmt: skip


# Words of common fine-tuning prompt templates ("a rendering of a {}", "a painting in the style of {}").
TINY_PROMPT_WORDS: tuple[str, ...] = (
    "picture", "image", "rendering", "painting", "drawing", "style", "shape", "small", "large",
    "good", "nice", "clean", "dark", "bright", "close", "up", "cropped", "my", "one", "this",
)  # fmt: skip


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes 0..255 (GPT-2 / CLIP convention):
    printable Latin-1 bytes stand for themselves, the others are shifted to code points 256+."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _word_symbols(word: str, alphabet: list[str]) -> tuple[str, ...]:
    """A word as its initial BPE symbols: byte characters, the last one carrying ``</w>``."""
    chars = [alphabet[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every non-overlapping occurrence of ``pair``, left to right (as BPE encoding does)."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_merges(words: Iterable[str], alphabet: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges (Sennrich et al. 2016) on ``words`` until every word is one symbol.

    Each step merges the most frequent adjacent pair (ties broken lexicographically, so the result is
    deterministic); applying the merges by rank, as the CLIP tokenizer does, rebuilds each word.
    """
    sequences = [_word_symbols(w, alphabet) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seq in sequences:
            counts.update(itertools.pairwise(seq))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        sequences = [_merge_pair(seq, best) for seq in sequences]


def normalise_words(words: Iterable[str]) -> list[str]:
    """Lower-case, de-duplicate (keeping order) and check that each word is one CLIP pre-token."""
    out: dict[str, None] = {}
    for word in words:
        word = str(word).strip().lower()
        if not word:
            continue
        if not re.fullmatch(r"[^\W\d_]+", word):
            raise ValueError(
                f"vocabulary word {word!r} must be letters only: CLIP splits text into letter runs, "
                "single digits and punctuation runs, so other strings can never be one token"
            )
        out[word] = None
    return list(out)


def write_tiny_clip_tokenizer(directory: str | os.PathLike, words: Sequence[str]) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of a small CLIP BPE tokenizer into ``directory``.

    Vocabulary (ids in this order): the 256 byte characters, the same with ``</w>`` (so ANY text
    tokenizes, byte by byte), the symbols produced by merges learned on ``words`` (so each word is a
    single ``word</w>`` token), then ``<|startoftext|>`` and ``<|endoftext|>``. Files are written
    atomically, so concurrent processes (DDP ranks) may build the same folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = _learn_merges(normalise_words(words), alphabet)
    tokens = (
        alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab = {tok: i for i, tok in enumerate(OrderedDict.fromkeys(tokens))}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }
    for name, text in files.items():
        atomic_write_text(directory / name, text, only_if_changed=True)
    return directory


def tiny_clip_tokenizer(
    vocab_words: Sequence[str] | None, max_length: int, cache_folder: str | os.PathLike | None = None
) -> tuple[CLIPTokenizer, Path]:
    """(tokenizer, its folder): one ``word</w>`` token per word of ``vocab_words`` (default:
    ``TINY_DATASET_WORDS + TINY_PROMPT_WORDS``), files in ``cache_folder/<hash of the words>`` (default
    ``$LDM_CACHE_DIR`` or ``<tmp>/ldm-cache``, then ``tiny-clip-tokenizer/``), written once and reused."""
    words = normalise_words(
        vocab_words if vocab_words is not None else TINY_DATASET_WORDS + TINY_PROMPT_WORDS
    )
    digest = hashlib.sha256("\n".join([_TINY_TOKENIZER_FORMAT, *words]).encode()).hexdigest()[:16]
    folder = Path(cache_folder) if cache_folder is not None else cache_dir("tiny-clip-tokenizer")
    tokenizer_dir = write_tiny_clip_tokenizer(folder / digest, words)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(tokenizer_dir), model_max_length=max_length, local_files_only=True
    )
    single = tokenizer(words, add_special_tokens=False)["input_ids"]
    broken = [w for w, ids in zip(words, single) if len(ids) != 1]
    if broken:
        raise RuntimeError(f"tiny tokenizer in {tokenizer_dir} does not keep these words whole: {broken}")
    return tokenizer, tokenizer_dir


def init_weights_seeded(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic init independent of transformers' init scheme: modules in name order, Linear and
    Embedding weights ~ N(0, std^2) from one seeded generator, biases 0, LayerNorm weights 1."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            else:
                continue
            seen.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in model.named_parameters() if id(p) not in seen]
    if missed:
        raise RuntimeError(f"seeded init does not cover parameters {missed}")


def tiny_clip_model(
    tokenizer: CLIPTokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 20,
    seed: int = 0,
    intermediate_size: int | None = None,
    projection_dim: int | None = None,
) -> CLIPTextModel:
    """A small ``CLIPTextModel`` for ``tokenizer`` (quick_gelu, ``max_length`` positions), initialised by
    ``init_weights_seeded(model, seed)``; with ``projection_dim`` a ``CLIPTextModelWithProjection``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # transformers' own init must not disturb the global RNG
        model = (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)
    init_weights_seeded(model, seed)
    return model
