"""CLIPTextEncoder: tiny offline preset, tokenization, freezing, cache, save/load, presets, add_tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ldm.modules.text_encoder import TINY_DATASET_WORDS, CLIPTextEncoder

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model" / "text_encoder"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in these tests may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "tok"


@pytest.fixture
def encoder(cache_dir):
    return CLIPTextEncoder.tiny(cache_dir=cache_dir)


def test_tiny_is_deterministic_and_leaves_global_rng_alone(cache_dir, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = CLIPTextEncoder.tiny(cache_dir=cache_dir)
    assert torch.equal(torch.rand(1), expected_next)
    second = CLIPTextEncoder.tiny(cache_dir=tmp_path / "elsewhere")  # fresh tokenizer files too
    prompts = ["a red circle on a blue background", "an orange star"]
    assert torch.equal(first(prompts), second(prompts))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other_seed = CLIPTextEncoder.tiny(cache_dir=cache_dir, seed=1)
    assert not torch.equal(first(prompts), other_seed(prompts))


def test_tokenizer_files_are_written_once_and_reused(cache_dir):
    CLIPTextEncoder.tiny(cache_dir=cache_dir)
    files = sorted(cache_dir.rglob("*"))
    assert {f.name for f in files if f.is_file()} == {"vocab.json", "merges.txt"}
    stamps = {f: f.stat().st_mtime_ns for f in files if f.is_file()}
    CLIPTextEncoder.tiny(cache_dir=cache_dir)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps


def test_vocabulary_words_are_single_tokens(encoder):
    tok = encoder.tokenizer
    ids = encoder.tokenize(["a red circle"])
    assert ids.dtype == torch.long and ids.shape == (1, encoder.max_length)
    row = ids[0].tolist()
    assert row[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(row[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    assert row[4] == tok.eos_token_id
    assert row[5:] == [tok.pad_token_id] * (encoder.max_length - 5)
    for word in TINY_DATASET_WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_unknown_text_falls_back_to_bytes_and_truncates(encoder):
    tok = encoder.tokenizer
    ids = encoder.tokenize(["zebra über 42!"])[0].tolist()
    tokens = tok.convert_ids_to_tokens(ids)
    assert tok.unk_token_id not in ids[1 : ids.index(tok.eos_token_id)]  # every byte is in the vocabulary
    assert tokens[1:6] == ["z", "e", "b", "r", "a</w>"]
    long_ids = encoder.tokenize([" ".join(["red"] * 50)])[0].tolist()
    assert len(long_ids) == encoder.max_length and long_ids[-1] == tok.eos_token_id


def test_output_shape_and_prompt_sensitivity(encoder):
    out = encoder(["a red circle on a blue background", "a green square on a white background", ""])
    assert out.shape == (3, encoder.max_length, 64)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    # per-word features differ at the word's own position
    red, blue = encoder(["a red circle", "a blue circle"])[:, 2]
    assert torch.cosine_similarity(red, blue, dim=0) < 0.9
    assert torch.equal(encoder("a red circle"), encoder(["a red circle"]))


def test_layer_options(cache_dir):
    last = CLIPTextEncoder.tiny(cache_dir=cache_dir)
    penult = CLIPTextEncoder.tiny(cache_dir=cache_dir, layer="penultimate")
    raw = CLIPTextEncoder.tiny(cache_dir=cache_dir, layer=-1, final_layer_norm=False)
    normed = CLIPTextEncoder.tiny(cache_dir=cache_dir, layer=-1)
    prompts = ["a red circle"]
    assert torch.allclose(normed(prompts), last(prompts), atol=1e-6)  # hidden_states[-1] + final LN == last
    assert not torch.allclose(raw(prompts), last(prompts))
    assert penult(prompts).shape == last(prompts).shape
    assert not torch.allclose(penult(prompts), last(prompts))
    with pytest.raises(ValueError):
        CLIPTextEncoder.tiny(cache_dir=cache_dir, layer="first")


def test_frozen_has_no_grad_and_stays_in_eval(encoder):
    parent = nn.ModuleDict({"cond": encoder, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not encoder.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    out = encoder(["a red circle"])
    assert not out.requires_grad
    encoder.unfreeze().train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    assert encoder(["a red circle"]).requires_grad


def test_cache_returns_identical_tensors_and_skips_encoder(encoder, monkeypatch):
    calls = []
    original = encoder.encode_ids

    def counting(input_ids):
        calls.append(input_ids.shape[0])
        return original(input_ids)

    monkeypatch.setattr(encoder, "encode_ids", counting)
    prompts = ["a red circle", "a blue square"]
    first = encoder.encode_cached(prompts)
    assert calls == [2]
    second = encoder.encode_cached(prompts)
    assert calls == [2]
    assert torch.equal(first, second)
    assert torch.equal(first, original(encoder.tokenize(prompts)))
    mixed = encoder.encode_cached(["a blue square", "a pink heart", "a pink heart"])
    assert calls == [2, 1]  # only the new prompt, once
    assert torch.equal(mixed[0], first[1]) and torch.equal(mixed[1], mixed[2])
    encoder.clear_cache()
    encoder.encode_cached(prompts)
    assert calls == [2, 1, 2]
    # weights loaded through load_state_dict invalidate the cache
    encoder.load_state_dict(encoder.state_dict())
    encoder.encode_cached(prompts)
    assert calls == [2, 1, 2, 2]
    # not frozen -> no caching
    encoder.unfreeze()
    encoder.encode_cached(prompts)
    encoder.encode_cached(prompts)
    assert calls == [2, 1, 2, 2, 2, 2]


def test_cache_is_bounded(cache_dir):
    encoder = CLIPTextEncoder.tiny(cache_dir=cache_dir, cache_size=2)
    encoder.encode_cached(["a", "red", "blue"])
    assert len(encoder._cache) == 2


@pytest.mark.parametrize("layout", ["plain", "diffusers"])
def test_save_and_from_pretrained_round_trip(encoder, tmp_path, layout):
    folder = encoder.save_pretrained(tmp_path / "saved", layout=layout)
    if layout == "diffusers":
        assert (folder / "text_encoder" / "config.json").is_file()
    tokenizer_dir = folder / "tokenizer" if layout == "diffusers" else folder
    assert (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()
    model_dir = folder / "text_encoder" if layout == "diffusers" else folder
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:  # released CLIP key names
        names = weights.keys()
    assert names and all(name.startswith("text_model.") for name in names)
    loaded = CLIPTextEncoder.from_pretrained(folder)
    assert loaded.max_length == encoder.max_length
    assert loaded.frozen and not any(p.requires_grad for p in loaded.parameters())
    prompts = ["a red circle on a blue background", "unknown words here"]
    assert torch.equal(loaded.tokenize(prompts), encoder.tokenize(prompts))
    assert torch.equal(loaded(prompts), encoder(prompts))
    if layout == "diffusers":  # explicit subfolders work too
        explicit = CLIPTextEncoder.from_pretrained(
            folder, subfolder="text_encoder", tokenizer_subfolder="tokenizer"
        )
        assert torch.equal(explicit(prompts), encoder(prompts))


def test_hub_id_offline_fails_fast_with_advice(tmp_path):
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        CLIPTextEncoder.from_pretrained("nonexistent-org/clip-model-xyz", hub_cache_dir=tmp_path / "hub")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "local folder" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(FileNotFoundError):
        CLIPTextEncoder.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_from_config_vit_l_14_on_meta_has_sd_v1_keys():
    encoder = CLIPTextEncoder.from_config("vit_l_14", device="meta")
    state = encoder.transformer.state_dict()
    assert state["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert state["text_model.encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)
    assert state["text_model.final_layer_norm.weight"].shape == (768,)
    assert "text_model.encoder.layers.12.mlp.fc2.weight" not in state
    assert state["text_model.embeddings.token_embedding.weight"].is_meta
    config = encoder.transformer.config
    assert (config.num_attention_heads, config.max_position_embeddings, config.hidden_act) == (
        12,
        77,
        "quick_gelu",
    )
    assert encoder.max_length == 77 and encoder.tokenizer is None
    with pytest.raises(RuntimeError, match="no tokenizer"):
        encoder.tokenize(["a"])
    # the SD v1 prefix maps straight onto a parent holding the encoder as cond_stage_model
    parent = nn.Module()
    parent.cond_stage_model = encoder
    assert (
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in parent.state_dict()
    )


def test_from_config_meta_then_assign_load(encoder, cache_dir, tmp_path):
    tokenizer_dir = encoder.save_pretrained(tmp_path / "tiny", layout="diffusers") / "tokenizer"
    config = encoder.transformer.config.to_dict()
    empty = CLIPTextEncoder.from_config(config, tokenizer_path=tokenizer_dir, device="meta")
    result = empty.load_state_dict(encoder.state_dict(), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not empty.training
    prompts = ["a red circle", "a blue square"]
    assert torch.equal(empty(prompts), encoder(prompts))


def test_add_tokens_grows_embedding_and_initialises_from_words(encoder):
    before = encoder.token_embedding.weight.detach().clone()
    tok = encoder.tokenizer
    cached = encoder.encode_cached(["a red circle"])
    ids = encoder.add_tokens(["<shiny>", "<shiny-1>"], init_words=["red", "blue circle"])
    weight = encoder.token_embedding.weight
    assert weight.shape[0] == before.shape[0] + 2 == len(tok)
    assert ids == [before.shape[0], before.shape[0] + 1]
    assert torch.equal(weight[: before.shape[0]], before)
    red = tok.convert_tokens_to_ids("red</w>")
    blue, circle = tok.convert_tokens_to_ids(["blue</w>", "circle</w>"])
    assert torch.allclose(weight[ids[0]], before[red])
    assert torch.allclose(weight[ids[1]], (before[blue] + before[circle]) / 2)
    assert not weight.requires_grad  # frozen state kept
    row = encoder.tokenize(["a photo of <shiny>"])[0].tolist()
    assert ids[0] in row and row.index(tok.eos_token_id) == 5  # bos a photo of <shiny> eos
    assert not encoder._cache  # cleared
    assert torch.equal(encoder.encode_cached(["a red circle"]), cached)  # old prompts unchanged
    # defaults to the mean embedding; clashes are refused
    (mean_id,) = encoder.add_tokens(["<plain>"])
    assert torch.allclose(encoder.token_embedding.weight[mean_id], weight.detach().mean(0), atol=1e-6)
    with pytest.raises(ValueError):
        encoder.add_tokens(["<shiny>"])
    with pytest.raises(ValueError):
        encoder.add_tokens(["<a>", "<b>"], init_words=["red", "blue", "green"])


def test_device_and_dtype_follow_module(encoder, cache_dir):
    assert encoder.device == torch.device("cpu")
    half = CLIPTextEncoder.tiny(cache_dir=cache_dir).to(torch.bfloat16)
    out = half.encode_cached(["a red circle"])
    assert out.dtype == torch.bfloat16 and out.device == half.device


def test_hydra_configs_instantiate(encoder, tmp_path):
    import hydra.utils as hydra_utils
    import omegaconf

    tiny_cfg = omegaconf.OmegaConf.load(CONF_DIR / "tiny.yaml")
    tiny_cfg.cache_dir = str(tmp_path / "tok")
    tiny = hydra_utils.instantiate(tiny_cfg)
    assert isinstance(tiny, CLIPTextEncoder)
    assert torch.equal(tiny(["a red circle"]), encoder(["a red circle"]))

    folder = encoder.save_pretrained(tmp_path / "sd", layout="diffusers")
    for name in ("clip_vit_l.yaml", "openclip_vit_h.yaml"):
        cfg = omegaconf.OmegaConf.load(CONF_DIR / name)
        assert omegaconf.OmegaConf.is_missing(cfg, "path")
        cfg.path = str(folder)
        loaded = hydra_utils.instantiate(cfg)
        assert loaded.tokenize(["a red circle"]).shape == (1, encoder.max_length)


def test_from_pretrained_full_clip_model_folder(encoder, tmp_path):
    """A CLIPModel folder (e.g. a local copy of openai/clip-vit-large-patch14): the text tower loads."""
    from transformers import CLIPConfig, CLIPModel

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=encoder.transformer.config.to_dict(),
        vision_config={**vision, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    full = CLIPModel(config)
    full.text_model.load_state_dict(encoder.transformer.text_model.state_dict())
    full.save_pretrained(tmp_path / "clip")
    encoder.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = CLIPTextEncoder.from_pretrained(tmp_path / "clip")
    assert torch.equal(loaded(["a red circle"]), encoder(["a red circle"]))


def test_from_pretrained_refuses_missing_weights(encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = encoder.save_pretrained(tmp_path / "partial", layout="plain")
    state = load_file(str(folder / "model.safetensors"))
    del state["text_model.final_layer_norm.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layer_norm"):
        CLIPTextEncoder.from_pretrained(folder)
