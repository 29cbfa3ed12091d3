"""SD single files without a tokenizer, offline: CLIP's tokenizer from open_clip_torch's BPE vocabulary file
(the package is only located, never imported), and a clear stop naming the flag, before any weights load,
when it is absent.

The real vocabulary file is not needed here: a stand-in ``open_clip`` package with a file of the same format
and size (48,894 merges) is put on sys.path. (With the real file, "a photo of a cat" gives OpenAI's ids
49406, 320, 1125, 539, 320, 2368, 49407.)
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

import sample
from ldm.diffusion import DiffusionSchedule
from ldm.io.clip_bpe import N_MERGES, bytes_to_unicode, clip_tokenizer_from_bpe, open_clip_bpe_path
from ldm.io.components import SDComponents
from ldm.io.single_file_export import export_components
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.unet import UNetModel
from ldm.modules.vae import AutoencoderKL
from tests.interop_parts import TINY_UNET, TINY_VAE, perturb


@pytest.fixture
def stand_in_open_clip(tmp_path, monkeypatch):
    """An ``open_clip`` package folder holding a BPE file in CLIP's format: header + 48,894 merges."""
    base = list(bytes_to_unicode().values())
    merges = [f"{a} {b}" for a in base for b in base][:N_MERGES]
    package = tmp_path / "site" / "open_clip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "bpe_simple_vocab_16e6.txt.gz").write_bytes(
        gzip.compress("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges, ""]).encode())
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    return package / "bpe_simple_vocab_16e6.txt.gz"


def test_tokenizer_from_the_bpe_file(stand_in_open_clip):
    assert open_clip_bpe_path() == stand_in_open_clip
    tokenizer = clip_tokenizer_from_bpe(stand_in_open_clip)
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    ids = tokenizer("ab").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and tokenizer.pad_token_id == 49407  # SD v1 pads with EOS
    assert ids[1:-1] == [tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b</w>")]
    # SD 2.x pads with "!"
    assert clip_tokenizer_from_bpe(stand_in_open_clip, pad_token="!").pad_token_id == 0


@pytest.fixture(scope="module")
def clip_vocab_file(tmp_path_factory):
    """A tiny SD single file whose text encoder has CLIP's 49,408-token vocabulary: no tokenizer is
    embedded."""
    text = CLIPTextEncoder.from_config(
        {
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
        }
    )
    torch.manual_seed(0)
    components = SDComponents(
        perturb(UNetModel(**TINY_UNET), 4),
        perturb(AutoencoderKL(**TINY_VAE), 6),
        text,
        DiffusionSchedule.from_config(),
        "eps",
        0.5,
        "custom",
        16,
    )
    return export_components(components, tmp_path_factory.mktemp("sd") / "clip_vocab.safetensors")


def test_sample_py_uses_the_fallback_offline(clip_vocab_file, stand_in_open_clip, tmp_path, monkeypatch):
    from safetensors import safe_open

    import ldm.io.sd_tokenizer

    monkeypatch.setattr(ldm.io.sd_tokenizer, "DEFAULT_TOKENIZERS", {})  # as offline with an empty HF cache
    built = []
    monkeypatch.setattr(
        ldm.io.sd_tokenizer,
        "clip_tokenizer_from_bpe",
        lambda *a, **k: built.append(a[0]) or clip_tokenizer_from_bpe(*a, **k),
    )

    with safe_open(str(clip_vocab_file), framework="pt") as handle:
        assert not any(k.startswith("ldm.tokenizer/") for k in handle.metadata())
    sample.main(
        [
            "--ckpt",
            str(clip_vocab_file),
            "--prompt",
            "a red circle",
            "--n",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert len(list((tmp_path / "out").glob("000_*.png"))) == 1
    assert built == [stand_in_open_clip]  # once, before loading: the instance is passed on to the loader


def test_no_tokenizer_stops_before_loading_and_names_the_flag(clip_vocab_file, monkeypatch, capsys):
    import ldm.io.sd_tokenizer
    import ldm.models.base_loader

    monkeypatch.setattr(ldm.io.sd_tokenizer, "open_clip_bpe_path", lambda: None)
    monkeypatch.setattr(ldm.io.sd_tokenizer, "DEFAULT_TOKENIZERS", {})

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the tokenizer check")

    monkeypatch.setattr(ldm.models.base_loader, "load_base_model", no_loading)
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", str(clip_vocab_file), "--prompt", "x", "--n", "1"])
    message = str(stop.value)
    assert "embeds no tokenizer" in message and "--tokenizer" in message and "model.base_tokenizer" in message
    assert "pip install --no-deps open_clip_torch" in message
    assert Path(clip_vocab_file).is_file()
