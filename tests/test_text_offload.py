"""Text encoder offloaded after caching (model.offload_text_encoder): every caption is cached first, then the
weights leave; training gives the same weights as with the encoder in place and never needs its weights."""

from __future__ import annotations

import pytest
import torch

import ldm.models.finetune.module as finetune_module
from ldm.models.text_offload import cache_prompts_and_offload
from ldm.modules.text_encoder import CLIPTextEncoder
from tests.test_finetune_lora import base_ckpt, lora_overrides  # noqa: F401 (fixture)
from train import train


def test_cached_prompts_are_served_after_the_weights_are_gone(tmp_path):
    encoder = CLIPTextEncoder.tiny(cache_dir=tmp_path, cache_size=2)
    prompts = ["a red circle", "a blue square", "", "a red circle", "a green star"]
    expected = encoder(prompts)
    assert cache_prompts_and_offload(encoder, prompts, device="meta") == 4  # distinct prompts
    assert all(p.is_meta for p in encoder.parameters()) and encoder.cache_size == 4  # grew to hold them all
    torch.testing.assert_close(encoder.encode_cached(prompts, device="cpu"), expected, rtol=0, atol=0)


def test_a_trained_text_encoder_cannot_be_offloaded(tmp_path):
    encoder = CLIPTextEncoder.tiny(cache_dir=tmp_path).unfreeze()
    with pytest.raises(ValueError, match="offload_text_encoder=false"):
        cache_prompts_and_offload(encoder, ["a red circle"])


def offload_then_forbid_encoding(encoder, prompts):
    count = cache_prompts_and_offload(encoder, prompts)

    def encode_ids(input_ids):
        raise AssertionError("the offloaded text encoder was asked to encode")

    encoder.encode_ids = encode_ids
    encoder.offloaded = True
    return count


def test_lora_finetune_with_the_text_encoder_offloaded_trains_the_same(compose_cfg, base_ckpt, monkeypatch):  # noqa: F811
    states = []
    for offload in ("false", "true"):
        if offload == "true":  # after the offload, any use of the encoder's weights fails the run
            monkeypatch.setattr(finetune_module, "cache_prompts_and_offload", offload_then_forbid_encoding)
        cfg = compose_cfg(
            lora_overrides(
                base_ckpt,
                [
                    "data.cache_dir=null",
                    f"model.offload_text_encoder={offload}",
                    "callbacks.image_logger=null",
                    "trainer.limit_val_batches=0",
                ],
            ),
            output_name=f"offload-{offload}",
        )
        _, objects = train(cfg)
        model = objects["model"]
        assert objects["trainer"].global_step == 4
        states.append(model.method.state_dict())
    assert model.text_encoder.offloaded and model.text_encoder.device == torch.device("cpu")
    assert {"", "a red star on a blue background"} <= {prompt for prompt, _ in model.text_encoder._cache}
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0)


def test_offload_needs_the_latent_cache(compose_cfg, base_ckpt):  # noqa: F811
    cfg = compose_cfg(
        lora_overrides(base_ckpt, ["data.cache_latents=false", "model.offload_text_encoder=true"])
    )
    with pytest.raises(ValueError, match="data.cache_latents=true"):
        train(cfg)
