"""Textual inversion: placeholder tokens (multi-vector expansion, only the new rows train), the embedding
files other tools exchange (A1111/kohya, diffusers, A1111 .pt; unsafe pickles refused), caption rewriting."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch

from datamodules.placeholder_captions import OBJECT_TEMPLATES, PlaceholderCaptions
from ldm.io.embeddings import apply_embedding, load_embedding, parse_embedding_spec, save_embedding
from ldm.io.safe_load import UnsafeCheckpointError
from ldm.models.finetune.textual_inversion import STATE_KEY, TextualInversion
from ldm.modules.adapters.token_embeddings import (
    PlaceholderEmbedding,
    expand_placeholders,
    placeholder_tokens,
)
from ldm.modules.text_encoder import CLIPTextEncoder


@pytest.fixture
def encoder(tmp_path):
    return CLIPTextEncoder.tiny(cache_dir=tmp_path / "tok")


def sd_layout_encoder(tmp_path, hidden: int, heads: int, pad_token_id: int | None) -> CLIPTextEncoder:
    """A one-layer text encoder with the hidden size of SD1 (CLIP ViT-L, 768) or SD2 (OpenCLIP, 1024)."""
    tiny = CLIPTextEncoder.tiny(cache_dir=tmp_path / "tok")
    folder = tmp_path / f"tokenizer_{hidden}"
    tiny.tokenizer.save_pretrained(str(folder))
    config = {
        "vocab_size": len(tiny.tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "max_position_embeddings": 20,
        "bos_token_id": tiny.tokenizer.bos_token_id,
        "eos_token_id": tiny.tokenizer.eos_token_id,
        "pad_token_id": tiny.tokenizer.eos_token_id if pad_token_id is None else pad_token_id,
    }
    return CLIPTextEncoder.from_config(config, tokenizer_path=folder)


def attach(encoder, **kwargs) -> TextualInversion:
    method = TextualInversion(**kwargs)
    method.attach(types.SimpleNamespace(text_encoder=encoder))
    return method


# -- placeholder tokens --------------------------------------------------------------------------------------


def test_multi_vector_placeholder_expands_to_consecutive_tokens(encoder):
    assert placeholder_tokens("<x>", 3) == ["<x>", "<x>_1", "<x>_2"]
    assert expand_placeholders("a <x> and <X>_1", {"<x>": ["<x>", "<x>_1"]}) == "a <x> <x>_1 and <X>_1"
    ids = encoder.add_placeholder("<shape-x>", num_vectors=3, init_text="star")
    assert ids == list(range(ids[0], ids[0] + 3))
    tokens = encoder.tokenize(["a red <shape-x> on a blue background"])[0].tolist()
    start = tokens.index(ids[0])
    assert tokens[start : start + 3] == ids
    assert encoder.tokenizer.convert_ids_to_tokens(tokens[start + 3]) == "on</w>"
    # every vector starts as the initializer word's embedding
    star = encoder.tokenizer.convert_tokens_to_ids("star</w>")
    weight = encoder.token_embedding.weight
    assert all(torch.equal(weight[i], weight[star]) for i in ids)
    with pytest.raises(ValueError, match="num_vectors"):
        placeholder_tokens("<y>", 0)


def test_only_the_new_rows_train_and_every_other_row_is_bit_identical(encoder):
    before = encoder.token_embedding.weight.detach().clone()
    frozen = {k: v.clone() for k, v in encoder.state_dict().items() if "token_embedding" not in k}
    method = attach(encoder, placeholder="<star>", num_vectors=2, initializer_word="star", weight_decay=0.1)
    assert not encoder.cache_enabled  # the prompt cache is off while the token trains
    start = method.state_dict()[STATE_KEY].clone()
    optimizer = torch.optim.AdamW([{**g, "weight_decay": 0.5} for g in method.param_groups()], lr=0.05)
    for _ in range(3):
        loss = encoder(["a red <star> on a blue background", "a green circle"]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [p for p in encoder.parameters() if p.requires_grad] == method.parameters()
    weight = encoder.token_embedding.weight
    assert torch.equal(weight[: before.shape[0]], before)  # old rows: untouched, weight decay included
    assert torch.equal(weight[before.shape[0] :], start)  # the base matrix keeps the initial new rows
    assert not torch.equal(method.state_dict()[STATE_KEY], start)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in frozen.items())
    # disabled(): the placeholder reads its initial rows again; other prompts never change
    trained = encoder(["a red <star>", "a green circle"]).detach()
    with method.disabled():
        off = encoder(["a red <star>", "a green circle"]).detach()
    assert not torch.allclose(trained[0], off[0]) and torch.equal(trained[1], off[1])


def test_random_initialisation_and_merge(encoder):
    torch.manual_seed(0)
    method = attach(encoder, placeholder="<r>", num_vectors=2, initializer_word=None)
    vectors = method.state_dict()[STATE_KEY]
    assert vectors.shape == (2, 64) and not torch.equal(vectors[0], vectors[1])
    embedding = encoder.token_embedding
    assert isinstance(embedding, PlaceholderEmbedding)
    merged = embedding.merged()
    ids = torch.tensor([len(encoder.tokenizer) - 2, len(encoder.tokenizer) - 1])
    assert torch.equal(merged(ids), embedding(ids))


@pytest.mark.parametrize(
    ("hidden", "heads", "pad"), [(768, 12, None), (1024, 16, 0)], ids=["sd1_clip_vit_l", "sd2_openclip"]
)
def test_sd1_and_sd2_text_encoder_layouts(tmp_path, hidden, heads, pad):
    encoder = sd_layout_encoder(tmp_path, hidden, heads, pad)
    fresh = copy.deepcopy(encoder)
    method = attach(encoder, placeholder="<cat-toy>", num_vectors=2, initializer_word="red")
    assert method.state_dict()[STATE_KEY].shape == (2, hidden)
    assert encoder(["a <cat-toy>"]).shape == (1, 20, hidden)
    path = method.export(tmp_path / "<cat-toy>.safetensors", {})  # the token is the file name
    apply_embedding(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(["a <cat-toy>"]), encoder(["a <cat-toy>"]))
    other = sd_layout_encoder(tmp_path, 1792 - hidden, 16, 0)  # the other base's width
    with pytest.raises(ValueError, match="another base model"):
        apply_embedding(other, path)


# -- files ---------------------------------------------------------------------------------------------------


def test_three_file_forms_round_trip(tmp_path):
    vectors = torch.randn(3, 64)
    a1111 = save_embedding(tmp_path / "my-star.safetensors", vectors, "<star>", "a1111")
    diffusers = save_embedding(tmp_path / "learned.safetensors", vectors, "<star>", "diffusers")
    from safetensors.torch import load_file

    assert list(load_file(str(a1111))) == ["emb_params"] and list(load_file(str(diffusers))) == ["<star>"]
    pt = tmp_path / "old-star.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": "old-star",
            "step": 500,
            "sd_checkpoint": "abc",
            "sd_checkpoint_name": "model",
        },
        pt,
    )
    bin_file = tmp_path / "learned_embeds.bin"
    torch.save({"<toy>": vectors[0]}, bin_file)
    # AUTOMATIC1111's rule: the token is the file name, whatever the file holds inside (issue 27)
    for path, token in [(a1111, "my-star"), (diffusers, "learned"), (pt, "old-star")]:
        loaded = load_embedding(path)
        assert loaded.token == token and torch.equal(loaded.vectors, vectors)
    assert load_embedding(bin_file).vectors.shape == (1, 64)
    # kohya / A1111 files written by other tools carry no metadata: the token is the file name
    from safetensors.torch import save_file

    save_file({"emb_params": vectors}, str(tmp_path / "kohya-star.safetensors"))
    assert load_embedding(tmp_path / "kohya-star.safetensors").token == "kohya-star"
    assert load_embedding(a1111, token="<s2>").token == "<s2>"
    assert parse_embedding_spec(f"{a1111}:<s3>") == (str(a1111), "<s3>")
    assert parse_embedding_spec(str(a1111)) == (str(a1111), None)


def test_a_renamed_file_triggers_under_its_new_name(tmp_path):
    """AUTOMATIC1111 takes the token from the file name, not from the name stored inside (issue 27)."""
    vectors = torch.randn(2, 64)
    for fmt, suffix in (("a1111", ".safetensors"), ("diffusers", ".safetensors"), ("a1111_pt", ".pt")):
        written = save_embedding(tmp_path / f"trained{suffix}", vectors, "<star>", fmt)
        renamed = written.rename(tmp_path / f"my-concept{suffix}")
        assert load_embedding(renamed).token == "my-concept", fmt
        assert load_embedding(renamed, token="<star>").token == "<star>"
        assert parse_embedding_spec(f"{renamed}:<x>") == (str(renamed), "<x>")


def test_a1111_pt_export_loads_with_weights_only(tmp_path):
    """export_format=a1111_pt writes AUTOMATIC1111's .pt dict, plain tensors / strings / numbers only."""
    vectors = torch.randn(3, 64)
    meta = {"steps": 40, "base": "sd15.safetensors", "base_sha256": "0123456789abcdef"}
    path = save_embedding(tmp_path / "gem.pt", vectors, "<gem>", "a1111_pt", meta)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["string_to_token"] == {"*": 265} and payload["name"] == "gem" and payload["step"] == 40
    assert (payload["sd_checkpoint"], payload["sd_checkpoint_name"]) == ("0123456789", "sd15.safetensors")
    assert torch.equal(payload["string_to_param"]["*"], vectors)
    assert load_embedding(path).token == "gem" and torch.equal(load_embedding(path).vectors, vectors)
    with pytest.raises(ValueError, match=r"a1111_pt embeddings are written as \.pt"):
        save_embedding(tmp_path / "gem.safetensors", vectors, "<gem>", "a1111_pt")
    method = TextualInversion(placeholder="<gem>", export_format="a1111_pt")
    assert method.export_suffix == ".pt"


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _RunsCode.ran = True
    return {}


def test_pt_needing_more_than_weights_only_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "payload": _RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_embedding(path)
    assert not _RunsCode.ran


def test_bad_files_give_clear_errors(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors")
    )
    with pytest.raises(ValueError, match="SDXL"):
        load_embedding(tmp_path / "xl.safetensors")
    with pytest.raises(FileNotFoundError):
        load_embedding(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="format"):
        save_embedding(tmp_path / "x.safetensors", torch.zeros(1, 4), "<x>", "pt")


def test_several_embeddings_work_in_prompts_and_negative_prompts(encoder, tmp_path):
    first = save_embedding(tmp_path / "<a>.safetensors", torch.randn(2, 64), "<a>")
    second = save_embedding(tmp_path / "b.safetensors", torch.randn(1, 64), "<b>", "diffusers")
    apply_embedding(encoder, first)
    apply_embedding(encoder, f"{second}:<bee>")
    ids = encoder.tokenize(["<a> and <bee>"])[0].tolist()
    assert ids[1:5] == encoder.tokenizer.convert_tokens_to_ids(["<a>", "<a>_1", "and</w>", "<bee>"])
    with torch.no_grad():
        assert not torch.allclose(encoder(["<a> circle"]), encoder(["<bee> circle"]))


# -- training prompts ----------------------------------------------------------------------------------------


def test_placeholder_captions():
    own = PlaceholderCaptions("<star>", "caption", concept_word="star")
    assert (
        own({"caption": "a red star on a blue background"})["caption"] == "a red <star> on a blue background"
    )
    assert own({"caption": "", "image": 1}) == {"caption": "", "image": 1}  # dropped captions stay empty
    reg = {"caption": "a red circle on a blue background", "is_regularization": True}
    assert own(reg) is reg
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        own({"caption": "a red circle on a blue background"})
    templates = PlaceholderCaptions("<star>", "object")
    captions = {templates({"caption": "x"})["caption"] for _ in range(50)}
    assert len(captions) > 3 and captions <= {t.format("<star>") for t in OBJECT_TEMPLATES}


# -- end to end: train.py, checkpoints, resume, sample.py, fidelity ----------------------------------------

TINY_PARTS = ["model/sampler=ddim", "model.sampler.steps=2", "callbacks.rich_progress_bar=null"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny txt2img checkpoint trained for a few steps on a hand-made VAE checkpoint."""
    from ldm.modules.vae import AutoencoderKL
    from tests.conftest import compose_train
    from train import train

    tmp = tmp_path_factory.mktemp("base")
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp / "vae.ckpt")
    cfg = compose_train(
        tmp,
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            *TINY_PARTS,
            "debug=smoke",
            "data.train_size=16",
            "data.val_size=4",
            f"model.vae_ckpt={tmp / 'vae.ckpt'}",
            "model.log_prompts=[a red circle on a blue background]",
        ],
    )
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def ti_overrides(base: Path, extra=()):
    return [
        "experiment=textual_inversion_star",
        *TINY_PARTS,
        "debug=smoke",
        f"model.base={base}",
        "data.source.train_size=16",
        "data.source.val_size=4",
        "data.batch_size=4",
        "data.cache_dir=null",
        "model.log_prompts=['a red <star> on a blue background']",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(base_ckpt, tmp_path_factory):
    """One smoke run of experiment=textual_inversion: (config, model, run folder)."""
    from tests.conftest import compose_train
    from train import train

    cfg = compose_train(tmp_path_factory.mktemp("ti"), ti_overrides(base_ckpt))
    _, objects = train(cfg)
    return cfg, objects["model"], Path(cfg.paths.output_dir)


def test_experiment_trains_only_the_new_vectors(trained, base_ckpt):
    from ldm.models.base_loader import load_base_model

    _, model, run = trained
    base = load_base_model(str(base_ckpt)).text_encoder
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.vectors"
    ]
    # every row of the base's token embedding, and every other text-encoder weight, is bit-identical
    rows = base.token_embedding.weight.shape[0]
    assert torch.equal(model.text_encoder.token_embedding.weight[:rows], base.token_embedding.weight)
    trained_state = model.text_encoder.state_dict()
    assert all(
        torch.equal(v, trained_state[k]) for k, v in base.state_dict().items() if "token_embedding" not in k
    )
    # the new vectors moved away from their initialisation (the word "star")
    star = base.tokenizer.convert_tokens_to_ids("star</w>")
    vectors = model.method.state_dict()[STATE_KEY]
    assert vectors.shape == (4, 64) and not torch.equal(vectors[0], base.token_embedding.weight[star])
    # before/after grids
    assert list((run / "images").glob("samples_*.png")) and list((run / "images").glob("base_samples_*.png"))


def test_checkpoint_holds_only_the_vectors_and_resume_restores_them(trained, base_ckpt, compose_cfg):
    from train import train

    _, model, run = trained
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"method.{STATE_KEY}", "scale_factor"}
    saved = ckpt["state_dict"][f"method.{STATE_KEY}"]
    assert saved.shape == model.method.state_dict()[STATE_KEY].shape  # last.ckpt may predate the final step
    resumed = compose_cfg(
        ti_overrides(
            base_ckpt,
            [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"trainer.max_steps={ckpt['global_step']}"],
        )
    )
    _, objects = train(resumed)  # nothing left to train: the module holds exactly what was restored
    assert objects["trainer"].global_step == ckpt["global_step"]
    assert torch.equal(objects["model"].method.state_dict()[STATE_KEY], saved)


def test_exported_embedding_works_in_sample_py(trained, base_ckpt, tmp_path):
    import sample
    from ldm.models import pipeline

    _, model, run = trained
    exported = run / "adapters" / "textual_inversion_star.safetensors"
    loaded = load_embedding(exported)
    assert loaded.token == "textual_inversion_star"  # the file name, as in AUTOMATIC1111
    torch.testing.assert_close(loaded.vectors, model.method.state_dict()[STATE_KEY])
    # the file's single key is A1111/kohya's
    from safetensors.torch import load_file

    assert list(load_file(str(exported))) == ["emb_params"]
    sampler_model = pipeline.load_for_sampling(str(base_ckpt), embeddings=[f"{exported}:<my-star>"])
    encoder = sampler_model.text_encoder
    ids = encoder.tokenizer.convert_tokens_to_ids(placeholder_tokens("<my-star>", 4))
    torch.testing.assert_close(encoder.token_embedding.weight[ids], loaded.vectors)
    grid = sample.main(
        [
            "--ckpt",
            str(base_ckpt),
            "--embedding",
            f"{exported}:<star>",
            "--prompt",
            "a red <star> on a blue background",
            "--negative-prompt",
            "a <star>",
            "--n",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "samples"),
        ]
    )
    assert grid.is_file()


def test_fidelity_benchmark_with_an_embedding(trained, base_ckpt, tmp_path):
    from benchmarks import fidelity

    _, _, run = trained
    exported = run / "adapters" / "textual_inversion_star.safetensors"
    grid = tmp_path / "before_after.png"
    results = fidelity.main(
        [
            "--ckpt",
            str(base_ckpt),
            "--embedding",
            str(exported),
            "--n",
            "2",
            "--samplers",
            "dpmpp_2m-20",
            "--compare-grid",
            str(grid),
            "--compare-columns",
            "2",
        ]
    )
    assert set(results) == {
        (s, "dpmpp_2m-20", v) for s in ("concept", "known") for v in ("base", "base+embedding")
    }
    # prompts without the token: the same images, so the same score
    assert results[("known", "dpmpp_2m-20", "base")] == results[("known", "dpmpp_2m-20", "base+embedding")]
    from PIL import Image

    assert Image.open(grid).size[0] > 4 * 96


def test_named_object_demo_trains_the_token_and_is_scored_on_unseen_backgrounds(base_ckpt, tmp_path_factory):
    """`python train.py experiment=textual_inversion` (the `<gem>` demo), then
    `python benchmarks/subject_fidelity.py --run <run>`: instance captions carry the token on the instance
    backgrounds only; the benchmark scores base and base + embedding on the other backgrounds."""
    from omegaconf import OmegaConf

    from benchmarks import subject_fidelity
    from tests.conftest import compose_train
    from train import train

    cfg = compose_train(
        tmp_path_factory.mktemp("gem"),
        [
            "experiment=textual_inversion",
            *TINY_PARTS,
            "debug=smoke",
            f"model.base={base_ckpt}",
            "data.batch_size=4",
            "data.cache_dir=null",
            "model.log_prompts=['a <gem> on a red background']",
        ],
    )
    _, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    captions = {objects["datamodule"].instance_sets[0][i]["caption"] for i in range(6)}
    assert captions == {
        "a <gem> on a blue background",
        "a <gem> on a green background",
        "a <gem> on a black background",
    }
    assert objects["model"].method.state_dict()[STATE_KEY].shape == (2, 64)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    grids = tmp_path_factory.mktemp("grids")
    results = subject_fidelity.main(
        ["--run", str(run), "--n", "2", "--sampler", "ddim", "--steps", "2", "--grid-dir", str(grids)]
    )
    assert set(results) == {
        ("<gem>", kind, name)
        for kind in ("subject", "class", "known")
        for name in ("base", "textual_inversion")
    }
    assert (grids / "gem_subject_textual_inversion.png").is_file()
    by_background = results[("<gem>", "subject", "textual_inversion")]["by_background"]
    assert by_background == {"red": (by_background["red"][0], 1), "yellow": (by_background["yellow"][0], 1)}
    prompts = subject_fidelity.subject_prompts(subject_fidelity.load_models(run, None)[1][0], 6)
    assert prompts[0] == "a <gem> on a red background" and "an orange background" in " ".join(prompts)
    assert not {"blue", "green", "black"} & {subject_fidelity.background_of(p) for p in prompts}
