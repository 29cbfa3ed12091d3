"""SDXL conditioning: the pooled bigG-style embedder, the size embedders, the conditioner of
``model/conditioner=sdxl_tiny`` with its condition dropout, and ``y`` reaching the UNet in training and
sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import CLIPTextModelWithProjection

from ldm.models.micro_conditions import sampling_batch, unet_condition
from ldm.modules.size_embedding import size_embedding
from ldm.modules.text_encoder_pooled import PooledCLIPTextEncoder
from ldm.modules.tiny_clip import tiny_clip_tokenizer
from tests.interop_parts import perturb

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTS = ["a red circle on a blue background", "a green triangle on a white background"]


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["model=latent_diffusion", *overrides]).model


@pytest.fixture(scope="module")
def xl_conditioner():
    return instantiate(compose_model("model/unet=sdxl_tiny", "model/conditioner=sdxl_tiny").conditioner)


def sizes(n: int, original=(32, 32), crop=(0, 0), target=(32, 32)) -> dict:
    return {
        "original_size_as_tuple": torch.tensor([original] * n),
        "crop_coords_top_left": torch.tensor([crop] * n),
        "target_size_as_tuple": torch.tensor([target] * n),
    }


def test_pooled_vector_is_the_projected_final_normed_end_token():
    tokenizer, _ = tiny_clip_tokenizer(None, 20)
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 20,
        "projection_dim": 24,
        "hidden_act": "gelu",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }  # SDXL's config: pool at argmax(input_ids)
    torch.manual_seed(0)
    encoder = PooledCLIPTextEncoder.from_config(config, layer="penultimate", final_layer_norm=False)
    encoder.tokenizer = tokenizer
    out = encoder(PROMPTS)
    ids = encoder.tokenize(PROMPTS)
    hf = encoder.transformer(input_ids=ids, output_hidden_states=True)
    final = encoder.transformer.text_model.final_layer_norm(hf.hidden_states[-1])
    pooled = final[torch.arange(2), ids.argmax(-1)] @ encoder.transformer.text_projection.weight.T
    assert out["vector"].shape == (2, 24) and torch.allclose(out["vector"], pooled, atol=1e-6)
    assert torch.equal(out["crossattn"], hf.hidden_states[-2])  # penultimate, no final layer norm
    # the HF CLIPTextModelWithProjection layout, under transformer. (diffusers' text_encoder_2 keys map 1:1)
    hf_keys = set(CLIPTextModelWithProjection(encoder.transformer.config).state_dict())
    assert {k.removeprefix("transformer.") for k in encoder.state_dict()} == hf_keys
    assert "text_projection.bias" not in hf_keys
    # cached encoding gives the same pair
    cached = encoder.encode_cached(PROMPTS)
    assert all(torch.equal(cached[k], out[k]) for k in out) and len(encoder._cache) == 2


def test_real_encoder_presets_have_sdxl_shapes():
    model = compose_model("model/conditioner=sdxl", "model/unet=sdxl")
    assert model.conditioner.embedders["0"].module.config == "vit_l_14_sdxl"
    bigg = PooledCLIPTextEncoder.from_config(
        "vit_bigg_14", device="meta", layer="penultimate", final_layer_norm=False
    )
    assert (bigg.hidden_size, bigg.projection_dim, bigg.transformer.config.num_hidden_layers) == (
        1280,
        1280,
        32,
    )
    assert model.unet.context_dim == 768 + 1280 and model.unet.adm_in_channels == 1280 + 3 * 2 * 256


def test_sdxl_tiny_conditioner_fills_the_unet(xl_conditioner):
    unet_config = compose_model("model/unet=sdxl_tiny", "model/conditioner=sdxl_tiny").unet
    out = xl_conditioner({"caption": PROMPTS, **sizes(2, (40, 48), (4, 8), (32, 32))})
    assert out["crossattn"].shape == (2, 20, unet_config.context_dim)  # 32 + 48
    assert out["vector"].shape == (2, unet_config.adm_in_channels)  # pooled 40 + 3 x 2 x 32
    numbers = torch.tensor([[40.0, 48, 4, 8, 32, 32]] * 2)
    assert torch.equal(
        out["vector"][:, 40:], size_embedding(numbers, 32)
    )  # pooled first, then the six numbers
    assert xl_conditioner.input_keys == [
        "caption",
        "original_size_as_tuple",
        "crop_coords_top_left",
        "target_size_as_tuple",
    ]


def test_condition_dropout_drops_each_text_embedder_to_empty_and_keeps_sizes(xl_conditioner):
    batch = {"caption": PROMPTS, **sizes(2, (40, 48), (4, 8))}
    empty = xl_conditioner({"caption": ["", ""], **sizes(2, (40, 48), (4, 8))})
    dropped = xl_conditioner(batch, ucg_rate=1.0, draw=lambda shape: torch.zeros(shape))  # every draw drops
    assert torch.equal(dropped["crossattn"], empty["crossattn"])  # "" (not zeros) for captions, both encoders
    assert torch.equal(dropped["vector"], empty["vector"])  # the pooled vector of "", the sizes as they were
    assert empty["vector"][:, :40].abs().max() > 0
    # the two text embedders draw independently (sgm): drop the first only
    draws = iter([torch.zeros(2), torch.ones(2)])
    half = xl_conditioner(batch, ucg_rate=0.5, draw=lambda shape: next(draws))
    kept = xl_conditioner(batch)
    assert torch.equal(half["crossattn"][..., :32], empty["crossattn"][..., :32])
    assert torch.equal(half["crossattn"][..., 32:], kept["crossattn"][..., 32:])
    assert torch.equal(half["vector"], kept["vector"])


def test_sampling_batch_defaults_and_errors():
    keys = ["caption", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
    batch = sampling_batch(keys, ["a", "b"], (64, 48))
    assert (
        batch["original_size_as_tuple"].tolist() == [[64, 48]] * 2 == batch["target_size_as_tuple"].tolist()
    )
    assert batch["crop_coords_top_left"].tolist() == [[0, 0]] * 2
    batch = sampling_batch(keys, ["a"], (64, 48), {"crop_top_left": (8, 4), "original_size": None})
    assert batch["crop_coords_top_left"].tolist() == [[8, 4]] and batch[
        "original_size_as_tuple"
    ].tolist() == [[64, 48]]
    assert set(sampling_batch(["caption"], ["a"], (64, 48))) == {"caption"}  # SD 1.x: no size keys
    with pytest.raises(ValueError, match="unknown size option"):
        sampling_batch(keys, ["a"], (8, 8), {"crop": (1, 2)})
    with pytest.raises(ValueError, match="crop_top_left must be two numbers"):
        sampling_batch(keys, ["a"], (8, 8), {"crop_top_left": (1, 2, 3)})
    context = torch.zeros(1, 2, 3)
    assert unet_condition({"crossattn": context}) is context
    assert set(unet_condition({"crossattn": context, "vector": torch.zeros(1, 4)})) == {"context", "y"}


def test_training_step_conditions_the_unet_on_the_sizes():
    cfg = compose_model(
        "model/unet=sdxl_tiny",
        "model/conditioner=sdxl_tiny",
        "model/vae=tiny",
        "model.scale_factor=1.0",
        "model.ema_decay=null",
        "model/sampler=ddim",
        "model.sampler.steps=2",
    )
    model = instantiate(cfg, _recursive_=True)
    perturb(model.unet, 0)  # the output conv starts at zero
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z0, losses = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), []
    for crop in [(0, 0), (8, 8)]:
        batch = {"image": images, "caption": PROMPTS, **sizes(2, (40, 40), crop)}
        _, condition = model.batch_latents_and_context(batch, train=False)
        assert set(condition) == {"context", "y"} and condition["y"].shape == (2, 232)
        losses.append(model.diffusion_step(z0, condition, torch.Generator().manual_seed(0)).item())
    assert losses[0] != losses[1]
    samples = [
        model.generate(PROMPTS[:1], seed=0, latent_size=8, sizes={"crop_top_left": crop})
        for crop in [(0, 0), (8, 8), (0, 0)]
    ]
    assert samples[0].shape == (1, 3, 32, 32) and torch.equal(samples[0], samples[2])
    assert (samples[0] - samples[1]).abs().max() > 1e-4
    with pytest.raises(KeyError, match="original_size_as_tuple"):  # a batch without its sizes: a clear error
        model.batch_latents_and_context({"image": images, "caption": PROMPTS}, train=False)


def test_sample_py_takes_the_three_sizes(tmp_path, monkeypatch):
    from PIL import Image

    from tests.conftest import load_script

    cfg = compose_model(
        "model/unet=sdxl_tiny",
        "model/conditioner=sdxl_tiny",
        "model/vae=tiny",
        "model.scale_factor=1.0",
        "model.ema_decay=null",
    )
    model = instantiate(cfg, _recursive_=True)
    perturb(model.unet, 0)
    model.image_resolution = 32
    sample = load_script("sample.py")
    monkeypatch.setattr(sample, "load_for_sampling", lambda *args, **kwargs: model)
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: seen.append(k["sizes"]) or generate(*a, **k))

    def grid(*sizes: str) -> torch.Tensor:
        out = tmp_path / str(len(seen))
        sample.main(
            [
                "--ckpt",
                "x",
                "--prompt",
                "a red circle",
                "--n",
                "1",
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "--out",
                str(out),
                *sizes,
            ]
        )
        return torch.from_numpy(np.asarray(Image.open(out / "grid.png"))).float()

    default = grid()
    assert seen[-1] == {
        "original_size": None,
        "crop_top_left": None,
        "target_size": None,
        "aesthetic_score": None,  # the SDXL refiner's (tests/test_sdxl_refiner.py)
        "negative_aesthetic_score": None,
    }
    same = grid("--original-size", "32", "32", "--crop-top-left", "0", "0", "--target-size", "32", "32")
    assert torch.equal(default, same)  # the defaults are original = target = the output size, crop (0, 0)
    cropped = grid("--crop-top-left", "16", "8")
    assert seen[-1]["crop_top_left"] == [16, 8] and not torch.equal(default, cropped)


def test_logged_grids_take_model_log_sizes():
    cfg = compose_model(
        "model/unet=sdxl_tiny",
        "model/conditioner=sdxl_tiny",
        "model/vae=tiny",
        "model.scale_factor=1.0",
        "model.ema_decay=null",
        "model/sampler=ddim",
        "model.sampler.steps=2",
        "model.log_prompts=[a red circle]",
        "model.log_sizes={crop_top_left:[8,8]}",
    )
    model = instantiate(cfg, _recursive_=True)
    perturb(model.unet, 0)
    logged = model.log_images({"image": torch.zeros(1, 3, 32, 32)})["samples"]
    assert torch.equal(logged, model.generate(["a red circle"], seed=0, sizes={"crop_top_left": (8, 8)}))
    assert not torch.equal(logged, model.generate(["a red circle"], seed=0))
