"""Frozen CLIP text encoder: the conditioning model of Stable Diffusion, plus a tiny offline preset.

``CLIPTextEncoder`` wraps a transformers ``CLIPTextModel`` and ``CLIPTokenizer``:

    prompts: list[str] -> tokenize -> input_ids LongTensor [B, L] -> encode_ids -> context [B, L, D]

and the context enters every UNet cross-attention as K and V (L = 77, D = 768 for SD v1).

Parameter names follow the Stable Diffusion v1 / transformers-4 layout on every transformers version:
``encoder.transformer.text_model.embeddings.token_embedding.weight`` ... so a SD v1 checkpoint's
``cond_stage_model.transformer.text_model.*`` keys load by prefix into ``cond_stage_model.`` (and kohya
``lora_te_text_model_*`` names map onto module paths). transformers 4 ``CLIPTextModel`` already nests the
network under ``.text_model``; transformers 5 dropped that level, so there ``self.transformer`` is a
``CLIPTextModelHolder`` whose ``.text_model`` is the ``CLIPTextModel``. Either way
``self.transformer.text_model`` holds ``embeddings``, ``encoder`` and ``final_layer_norm``, and
``self.transformer(input_ids=...)``, ``.config`` and ``.save_pretrained`` behave like the HF model.

Construction routes (all usable as a Hydra ``_target_``):

* ``CLIPTextEncoder.tiny(...)``: fully offline, deterministic; writes a small byte-level CLIP BPE
  tokenizer (``vocab.json`` + ``merges.txt``) whose whole-word tokens cover the embedded shapes
  dataset, and builds a randomly initialised ``CLIPTextModel`` from a fixed seed.
* ``CLIPTextEncoder.from_pretrained(path)``: a local diffusers folder (``text_encoder/`` +
  ``tokenizer/``), a plain HF CLIP folder, or a hub id (offline-aware, clear error when unreachable).
* ``CLIPTextEncoder.from_config("vit_l_14")``: architecture only (SD v1 shape), meta-device friendly,
  for checkpoint loaders that fill the weights from a Stable Diffusion file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "PRESETS",
    "TINY_DATASET_WORDS",
    "TINY_PROMPT_WORDS",
    "CLIPTextEncoder",
    "CLIPTextModelHolder",
    "write_tiny_clip_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

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

# Architecture presets (text tower only; no weights).
PRESETS: dict[str, dict[str, Any]] = {
    # SD v1.x: OpenAI CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), last hidden state.
    "vit_l_14": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
    # SD 2.x: OpenCLIP ViT-H/14 text tower in the diffusers layout, which keeps 23 of the 24 layers
    # (SD2 conditions on the penultimate layer), so use it with layer="last".
    "vit_h_14": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1024,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,  # OpenCLIP pads with "!" (id 0)
    },
}

_TRUTHY = {"1", "on", "yes", "true"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TINY_TOKENIZER_FORMAT = "tiny-clip-bpe-v1"  # bump when the tokenizer file layout changes


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read at call time."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# --------------------------------------------------------------------------------------------------
# Tiny byte-level BPE tokenizer files
# --------------------------------------------------------------------------------------------------


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


def _normalise_words(words: Iterable[str]) -> list[str]:
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
    merges = _learn_merges(_normalise_words(words), alphabet)
    tokens = (
        alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab = {tok: i for i, tok in enumerate(OrderedDict.fromkeys(tokens))}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }
    for name, text in files.items():
        target = directory / name
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    return directory


def _default_cache_dir() -> Path:
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "ldm-cache")
    return Path(root) / "tiny-clip-tokenizer"


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------


class CLIPTextModelHolder(nn.Module):
    """Puts a transformers-5 ``CLIPTextModel`` under ``.text_model`` so parameter names read
    ``text_model.embeddings...`` as in SD v1 checkpoints and transformers 4. Forwards calls to it."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_model(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """HF ``save_pretrained``, with the weights file rewritten under ``text_model.*`` names: the
        layout of released CLIP / diffusers folders, which transformers 4 needs and 5 also reads."""
        self.text_model.save_pretrained(save_directory, **kwargs)
        weights = Path(save_directory) / "model.safetensors"
        if weights.is_file():  # single-file save (sharded saves are left as transformers wrote them)
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(weights), metadata={"format": "pt"})


def _sd_layout(model: CLIPTextModel) -> nn.Module:
    """``model`` itself when it already nests ``text_model`` (transformers 4), else a holder."""
    return model if isinstance(getattr(model, "text_model", None), nn.Module) else CLIPTextModelHolder(model)


def _build_config(config: str | dict | CLIPTextConfig) -> CLIPTextConfig:
    if isinstance(config, CLIPTextConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown text encoder preset {config!r}; choose from {sorted(PRESETS)}")
        return CLIPTextConfig(**PRESETS[config])
    return CLIPTextConfig(**dict(config))


class CLIPTextEncoder(nn.Module):
    """Prompts -> CLIP token hidden states ``[B, max_length, hidden]`` (the cross-attention context).

    Args:
        transformer: a ``CLIPTextModel`` (wrapped to the SD v1 ``text_model.*`` layout if needed).
        tokenizer: its ``CLIPTokenizer``; may be None for a weights-only model (``from_config``), in
            which case only ``encode_ids`` works until ``self.tokenizer`` is set.
        max_length: tokens per prompt; default ``min(tokenizer.model_max_length,
            max_position_embeddings)`` (77 for real CLIP).
        layer: which hidden state to return:
            ``"last"`` -- ``last_hidden_state``, i.e. the last layer *after* ``final_layer_norm``
            (SD v1, and SD2 in the diffusers layout whose encoder already stops one layer early);
            ``"penultimate"`` -- the output of the second-to-last layer (SD2 / "clip skip 2");
            an ``int`` -- index into ``hidden_states`` (0 = embeddings, i = after layer i, -k counts
            from the end; A1111 "clip skip k" is ``-k``).
        final_layer_norm: apply ``final_layer_norm`` to a non-last layer (what SD2's OpenCLIP embedder,
            A1111 clip skip and diffusers ``clip_skip`` do). SDXL-style raw hidden states: False.
        freeze: no parameter requires grad and the module stays in eval mode through ``.train()``.
        cache_size: most prompts ``encode_cached`` keeps (least recently used are dropped); None = no limit.
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: CLIPTokenizer | None,
        max_length: int | None = None,
        layer: str | int = "last",
        final_layer_norm: bool = True,
        freeze: bool = True,
        cache_size: int | None = 4096,
    ):
        super().__init__()
        self.transformer = _sd_layout(transformer) if isinstance(transformer, CLIPTextModel) else transformer
        self.tokenizer = tokenizer
        positions = self.transformer.config.max_position_embeddings
        if max_length is None:
            tok_max = (
                getattr(tokenizer, "model_max_length", positions) if tokenizer is not None else positions
            )
            max_length = min(int(tok_max), positions)
        if not 2 <= max_length <= positions:
            raise ValueError(f"max_length={max_length} must be in [2, max_position_embeddings={positions}]")
        self.max_length = int(max_length)
        if isinstance(layer, str) and layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last', 'penultimate' or an int, got {layer!r}")
        self.layer = layer
        self.final_layer_norm = final_layer_norm
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, torch.dtype], torch.Tensor] = OrderedDict()
        self._frozen = False
        if freeze:
            self.freeze()
        # Weights loaded by load_state_dict (ours or a parent's) make cached embeddings stale.
        self.register_load_state_dict_post_hook(_clear_cache_after_load)

    # ---------------------------------------------------------------- properties and freezing

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> CLIPTextEncoder:
        """Stop gradients to every parameter and keep eval mode (dropout off) from now on."""
        self._frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> CLIPTextEncoder:
        """Make every parameter trainable again; ``.train()`` then behaves normally."""
        self._frozen = False
        self.requires_grad_(True)
        self.clear_cache()
        return self

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(mode and not self._frozen)

    # ---------------------------------------------------------------- encoding

    def _require_tokenizer(self) -> CLIPTokenizer:
        if self.tokenizer is None:
            raise RuntimeError(
                "this CLIPTextEncoder has no tokenizer (built from a config without tokenizer_path); "
                "set `encoder.tokenizer` or call encode_ids() with token ids"
            )
        return self.tokenizer

    @staticmethod
    def _as_list(prompts: str | Sequence[str]) -> list[str]:
        return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> input_ids LongTensor ``[B, max_length]`` on CPU: ``<|startoftext|>``, tokens,
        ``<|endoftext|>``, then pad tokens; prompts longer than ``max_length - 2`` tokens are truncated
        (the end token is kept)."""
        batch = self._require_tokenizer()(
            self._as_list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_tensors="pt",
        )
        return batch["input_ids"].long()

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``[B, L]`` -> hidden states ``[B, L, hidden]`` on the module's device. No attention
        mask, as in Stable Diffusion: the causal mask already hides the pads from earlier tokens."""
        input_ids = input_ids.to(self.device, torch.long)
        if self.layer == "last":
            return self.transformer(input_ids=input_ids).last_hidden_state
        outputs = self.transformer(input_ids=input_ids, output_hidden_states=True)
        index = -2 if self.layer == "penultimate" else int(self.layer)
        hidden = outputs.hidden_states[index]
        if self.final_layer_norm:
            hidden = self.transformer.text_model.final_layer_norm(hidden)
        return hidden

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts (B strings) -> context ``[B, max_length, hidden]``."""
        return self.encode_ids(self.tokenize(prompts))

    # ---------------------------------------------------------------- cache

    @property
    def cache_enabled(self) -> bool:
        """Caching is sound only while the weights cannot change: frozen and nothing requires grad
        (e.g. textual inversion re-enabling the token embedding turns the cache off)."""
        return self._frozen and not any(p.requires_grad for p in self.parameters())

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode_cached(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``forward`` with per-prompt memoisation while frozen (plain ``forward`` otherwise).

        Entries are keyed by ``(prompt, dtype)`` and stored detached on CPU (so GPU memory does not
        grow with the number of distinct prompts, and a device move never leaves stale devices behind);
        the result is moved to the module's current device. Misses are encoded in one batch.
        ``clear_cache()`` after changing weights in place (``load_state_dict`` and ``add_tokens`` clear it).
        """
        prompts = self._as_list(prompts)
        if not self.cache_enabled:
            return self(prompts)
        dtype = self.dtype
        missing = list(OrderedDict.fromkeys(p for p in prompts if (p, dtype) not in self._cache))
        if missing:
            with torch.no_grad():
                encoded = self(missing).detach().to("cpu")
            for prompt, embedding in zip(missing, encoded):
                self._cache[(prompt, dtype)] = embedding.clone()
        rows = []
        for prompt in prompts:
            self._cache.move_to_end((prompt, dtype))
            rows.append(self._cache[(prompt, dtype)])
        result = torch.stack(rows).to(self.device)
        if self.cache_size is not None:
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def empty_prompt_embedding(self, batch_size: int = 1) -> torch.Tensor:
        """Encoding of ``""`` repeated to ``[batch_size, max_length, hidden]``: the unconditional
        context for classifier-free guidance (and for condition dropout while training)."""
        return self.encode_cached([""]).repeat(batch_size, 1, 1)

    # ---------------------------------------------------------------- textual inversion support

    def add_tokens(self, tokens: Sequence[str], init_words: Sequence[str] | None = None) -> list[int]:
        """Add new tokens to the tokenizer and grow the token embedding; returns their ids.

        Row of token i = mean embedding of the tokens of ``init_words[i]`` (a single init word is used
        for all tokens); without ``init_words``, the mean of all existing rows. The module's frozen
        state is unchanged: textual inversion re-enables grad on ``token_embedding.weight`` itself.
        """
        tokenizer = self._require_tokenizer()
        tokens = [str(t) for t in tokens]
        if not tokens:
            return []
        vocab = tokenizer.get_vocab()
        clashes = [t for t in tokens if t in vocab]
        if clashes or len(set(tokens)) != len(tokens):
            raise ValueError(
                f"tokens must be new and distinct; already in the vocabulary or repeated: {clashes or tokens}"
            )
        if init_words is not None:
            init_words = [str(w) for w in init_words]
            if len(init_words) == 1:
                init_words = init_words * len(tokens)
            if len(init_words) != len(tokens):
                raise ValueError(f"got {len(init_words)} init_words for {len(tokens)} tokens")

        old = self.token_embedding
        weight = old.weight.detach()
        inits = []
        for i in range(len(tokens)):
            if init_words is None:
                inits.append(weight.mean(dim=0))
                continue
            ids = tokenizer(init_words[i], add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init word {init_words[i]!r} has no tokens")
            inits.append(weight[torch.as_tensor(ids, device=weight.device)].mean(dim=0))

        added = tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise RuntimeError(f"tokenizer added {added} of {len(tokens)} tokens {tokens}")
        new_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
        num_rows = max(len(tokenizer), max(new_ids) + 1, weight.shape[0])

        grown = nn.Embedding(num_rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            grown.weight[: weight.shape[0]] = weight
            for token_id, init in zip(new_ids, inits):
                grown.weight[token_id] = init
        grown.weight.requires_grad_(old.weight.requires_grad)
        self.transformer.text_model.embeddings.token_embedding = grown
        self.transformer.config.vocab_size = num_rows
        self.clear_cache()
        return new_ids

    # ---------------------------------------------------------------- construction

    @classmethod
    def tiny(
        cls,
        vocab_words: Sequence[str] | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 20,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        intermediate_size: int | None = None,
        **encoder_kwargs: Any,
    ) -> CLIPTextEncoder:
        """A small randomly initialised CLIP text encoder, fully offline and deterministic.

        The tokenizer covers every byte (any text tokenizes) and has one ``word</w>`` token per word
        of ``vocab_words`` (default: ``TINY_DATASET_WORDS + TINY_PROMPT_WORDS``). Its files go to
        ``cache_dir/<hash of the words>`` (default ``$LDM_CACHE_DIR`` or ``<tmp>/ldm-cache``,
        then ``tiny-clip-tokenizer/``), written once and reused. Weights are drawn from a
        ``torch.Generator`` seeded with ``seed`` in a fixed parameter order (the global RNG is left
        alone), so the same arguments give the same weights and embeddings on every machine.
        ``max_length`` (default 20) is also the number of position embeddings.
        """
        words = _normalise_words(
            vocab_words if vocab_words is not None else TINY_DATASET_WORDS + TINY_PROMPT_WORDS
        )
        digest = hashlib.sha256("\n".join([_TINY_TOKENIZER_FORMAT, *words]).encode()).hexdigest()[:16]
        folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        tokenizer_dir = write_tiny_clip_tokenizer(folder / digest, words)
        tokenizer = CLIPTokenizer.from_pretrained(
            str(tokenizer_dir), model_max_length=max_length, local_files_only=True
        )
        single = tokenizer(words, add_special_tokens=False)["input_ids"]
        broken = [w for w, ids in zip(words, single) if len(ids) != 1]
        if broken:
            raise RuntimeError(f"tiny tokenizer in {tokenizer_dir} does not keep these words whole: {broken}")

        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_length,
            hidden_act="quick_gelu",
            projection_dim=hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):  # transformers' own init must not disturb the global RNG
            model = CLIPTextModel(config)
        _init_weights_seeded(model, seed)
        return cls(model, tokenizer, max_length=max_length, **encoder_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        hub_cache_dir: str | os.PathLike | None = None,
        **encoder_kwargs: Any,
    ) -> CLIPTextEncoder:
        """Load weights + tokenizer from a local folder or a Hugging Face Hub id.

        Local folders: a diffusers model folder (``text_encoder/`` + ``tokenizer/`` are found by
        themselves), or a plain CLIP folder (``config.json``, weights, tokenizer files; a full
        ``CLIPModel`` folder such as clip-vit-large-patch14 works, its vision tower is ignored).
        Hub ids: pass ``subfolder="text_encoder"`` for a diffusers repo (the tokenizer then comes
        from ``tokenizer/``). ``local_files_only`` defaults to True when ``HF_HUB_OFFLINE=1`` (then
        only the local HF cache is used); a failure raises an OSError saying what to do.
        ``dtype`` casts after loading; other keywords go to the constructor (layer, max_length...).
        """
        path = os.fspath(path)
        local = Path(path).expanduser()
        if local.is_dir():
            model_dir, tokenizer_dir = _resolve_local_layout(local, subfolder, tokenizer_subfolder)
            try:
                model = _load_text_model(str(model_dir), local_files_only=True)
                tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
            except OSError as err:
                raise OSError(
                    f"could not load a CLIP text encoder from the local folder {str(local)!r} (model from "
                    f"{str(model_dir)!r}, tokenizer from {str(tokenizer_dir)!r}): {err}. Expected a diffusers "
                    "folder with text_encoder/ and tokenizer/, or a CLIP folder with config.json, "
                    "model weights, and vocab.json + merges.txt (or tokenizer.json)."
                ) from err
        else:
            if not _HUB_ID_RE.match(path) or path.startswith((".", "~")) or path.count("/") > 1:
                raise FileNotFoundError(f"text encoder folder {path!r} does not exist (and is not a hub id)")
            if local_files_only is None:
                local_files_only = _hub_offline()
            if tokenizer_subfolder is None:
                tokenizer_subfolder = "tokenizer" if subfolder == "text_encoder" else subfolder
            hub_kwargs: dict[str, Any] = {"local_files_only": local_files_only, "revision": revision}
            if hub_cache_dir is not None:
                hub_kwargs["cache_dir"] = os.fspath(hub_cache_dir)
            try:
                model = _load_text_model(path, subfolder=subfolder or "", **hub_kwargs)
                tokenizer = CLIPTokenizer.from_pretrained(
                    path, subfolder=tokenizer_subfolder or "", **hub_kwargs
                )
            except OSError as err:
                why = (
                    "HF_HUB_OFFLINE=1 (or local_files_only=True) allows only the local Hugging Face cache, "
                    "and it does not hold this model"
                    if local_files_only
                    else "it could not be downloaded"
                )
                hint = "" if subfolder else ' (pass subfolder="text_encoder" for a diffusers repo)'
                raise OSError(
                    f"{path!r} is not a local folder, so it was treated as a Hugging Face Hub id, but {why}. "
                    "Point `path` at a local folder instead (a diffusers model folder with text_encoder/ and "
                    "tokenizer/, or a CLIP folder with config.json, weights, vocab.json and merges.txt), or "
                    "on a machine with network access set HF_HUB_OFFLINE=0 so it can be downloaded"
                    f"{hint}. "
                    f"Original error: {err}"
                ) from err
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return cls(model, tokenizer, **encoder_kwargs)

    @classmethod
    def from_config(
        cls,
        config: str | dict | CLIPTextConfig = "vit_l_14",
        tokenizer_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **encoder_kwargs: Any,
    ) -> CLIPTextEncoder:
        """Architecture only (weights are transformers' random init, or unallocated on ``meta``).

        ``config``: a preset name (``"vit_l_14"`` = SD v1 ViT-L/14: hidden 768, 12 layers, 12 heads,
        MLP 3072, 77 positions, vocab 49408, quick_gelu; ``"vit_h_14"`` = SD2 diffusers shape), a dict
        of ``CLIPTextConfig`` fields, or a ``CLIPTextConfig``. With ``device="meta"`` no memory is
        allocated; the ``position_ids`` buffer (not in checkpoints) is still made real on CPU, so
        ``load_state_dict(sd, assign=True)`` yields a usable module. ``tokenizer_path``: local folder
        with the tokenizer files (without it the encoder has no tokenizer; see ``encode_ids``).
        """
        text_config = _build_config(config)
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.random.fork_rng(devices=[]):
            if device is not None:
                with torch.device(device):
                    model = CLIPTextModel(text_config)
            else:
                model = CLIPTextModel(text_config)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        embeddings = _sd_layout(model).text_model.embeddings
        if embeddings.position_ids.is_meta:
            embeddings.position_ids = torch.arange(text_config.max_position_embeddings).expand((1, -1))
        tokenizer = None
        if tokenizer_path is not None:
            tokenizer = CLIPTokenizer.from_pretrained(
                os.fspath(tokenizer_path),
                model_max_length=text_config.max_position_embeddings,
                local_files_only=True,
            )
        return cls(model, tokenizer, **encoder_kwargs)

    def save_pretrained(self, path: str | os.PathLike, layout: str = "diffusers") -> Path:
        """Write weights + tokenizer: ``layout="diffusers"`` -> ``path/text_encoder`` + ``path/tokenizer``;
        ``"plain"`` -> both in ``path``. Either loads back with ``from_pretrained(path)``."""
        if layout not in ("diffusers", "plain"):
            raise ValueError(f"layout must be 'diffusers' or 'plain', got {layout!r}")
        path = Path(path)
        model_dir = path / "text_encoder" if layout == "diffusers" else path
        tokenizer_dir = path / "tokenizer" if layout == "diffusers" else path
        self.transformer.save_pretrained(str(model_dir))
        tokenizer = self._require_tokenizer()
        tokenizer.model_max_length = self.max_length
        tokenizer.save_pretrained(str(tokenizer_dir))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not (tokenizer_dir / "vocab.json").is_file() and hasattr(getattr(backend, "model", None), "save"):
            # transformers 5 writes only tokenizer.json; slow CLIPTokenizer readers need vocab + merges
            backend.model.save(str(tokenizer_dir))
        return path

    def extra_repr(self) -> str:
        return f"max_length={self.max_length}, layer={self.layer!r}, frozen={self._frozen}"


def _load_text_model(path: str, **kwargs: Any) -> CLIPTextModel:
    """``CLIPTextModel.from_pretrained`` that refuses missing weights (they would stay random);
    unexpected ones (e.g. the vision tower of a full CLIP folder) are logged by transformers."""
    model, info = CLIPTextModel.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"text encoder weights at {path!r} lack {len(missing)} tensors, e.g. {missing[:5]}")
    return model


def _clear_cache_after_load(module: CLIPTextEncoder, incompatible_keys: Any) -> None:
    module.clear_cache()  # a module-level function, so the encoder stays picklable


def _resolve_local_layout(
    root: Path, subfolder: str | None, tokenizer_subfolder: str | None
) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) inside a local diffusers or plain CLIP folder."""
    if subfolder is None and (root / "text_encoder" / "config.json").is_file():
        subfolder = "text_encoder"
    model_dir = root / subfolder if subfolder else root
    if tokenizer_subfolder is None:
        tokenizer_files = ("tokenizer.json", "vocab.json")
        if (root / "tokenizer").is_dir():
            tokenizer_subfolder = "tokenizer"
        elif subfolder and any((model_dir / f).is_file() for f in tokenizer_files):
            tokenizer_subfolder = subfolder
    tokenizer_dir = root / tokenizer_subfolder if tokenizer_subfolder else root
    return model_dir, tokenizer_dir


def _init_weights_seeded(model: nn.Module, seed: int, std: float = 0.02) -> None:
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
