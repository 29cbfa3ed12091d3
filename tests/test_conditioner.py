"""The conditioner seam (ldm/modules/conditioner.py): embedders read batch keys, drop with their own rate,
concatenate contexts and vectors; configs compose; older checkpoints (text_encoder.* keys, a model_config with
a text_encoder) still load."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.models.checkpoint import load_lightning_model
from ldm.modules.conditioner import Conditioner, embedder, is_trainable
from ldm.modules.text_encoder import CLIPTextEncoder
from tests.test_latent_diffusion import TINY_LDM, tiny_model

PROMPTS = ["a red circle on a blue background", "a green square"]


class Sizes(nn.Module):
    """A size embedder: numbers [B, 2] -> a vector [B, 4]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 4)

    def forward(self, sizes):
        return self.proj(torch.as_tensor(sizes, dtype=torch.float32))


def test_contexts_and_vectors_concatenate_along_features():
    first, second = CLIPTextEncoder.tiny(), CLIPTextEncoder.tiny(hidden_size=32, seed=1)
    sizes = embedder(Sizes(), input_key="size")
    conditioner = Conditioner({"1": second, "0": first, "2": sizes})  # mapping keys give the order
    batch = {"caption": PROMPTS, "size": [[32, 32], [64, 48]]}
    out = conditioner(batch)
    assert out["crossattn"].shape == (2, 20, 96) and out["vector"].shape == (2, 4)
    torch.testing.assert_close(out["crossattn"][..., :64], first(PROMPTS))
    torch.testing.assert_close(out["crossattn"][..., 64:], second(PROMPTS))
    torch.testing.assert_close(out["vector"], sizes(batch["size"]))
    assert conditioner.context_dim == 96 and conditioner.text_embedders == [first, second]
    assert is_trainable(sizes) and not is_trainable(first)
    with pytest.raises(ValueError, match="2 text embedders"):
        conditioner.text_encoder  # noqa: B018


def test_each_embedder_drops_with_its_own_rate():
    text, sizes = CLIPTextEncoder.tiny(), embedder(Sizes(), input_key="size", ucg_rate=1.0)
    conditioner = Conditioner([embedder(text, ucg_rate=0.0), sizes])
    batch = {"caption": PROMPTS, "size": [[32, 32], [64, 48]]}
    out = conditioner(batch, ucg_rate=0.5, draw=torch.rand)  # the model's rate is for embedders without one
    torch.testing.assert_close(out["crossattn"], text(PROMPTS))  # rate 0: kept
    assert not out["vector"].any()  # rate 1: a dropped number condition is a zero embedding
    fresh = CLIPTextEncoder.tiny()  # no rate of its own: the model's applies
    dropped = Conditioner([fresh])(batch, ucg_rate=1.0, draw=torch.rand)["crossattn"]
    torch.testing.assert_close(dropped, fresh(["", ""]))  # a dropped caption is "" (not zeros)


def test_a_missing_batch_key_is_named():
    with pytest.raises(KeyError, match="'size'"):
        Conditioner([embedder(Sizes(), input_key="size")])({"caption": PROMPTS})


def test_config_composes_the_text_encoder_preset_as_the_embedder(compose_cfg):
    cfg = compose_cfg(
        [
            *TINY_LDM,
            "model/text_encoder=clip_vit_l",
            "model.ucg_rate=0.2",
            "model.conditioner.embedders.0.module.path=some/folder",
        ]
    )
    entry = cfg.model.conditioner.embedders["0"]
    assert (
        entry.module._target_.endswith("CLIPTextEncoder.from_pretrained")
        and entry.module.path == "some/folder"
    )
    assert entry.input_key == "caption" and entry.ucg_rate is None and "text_encoder" not in cfg.model


def test_embedder_ucg_rate_in_the_config_overrides_the_model_rate(compose_cfg):
    cfg = compose_cfg([*TINY_LDM, "model.ucg_rate=1.0", "model.conditioner.embedders.0.ucg_rate=0.0"])
    model = hydra.utils.instantiate(cfg.model)
    assert model.text_encoder is model.conditioner.embedders[0] and model.text_encoder.ucg_rate == 0.0
    context = model.conditions({"caption": PROMPTS}, train=True)["crossattn"]
    torch.testing.assert_close(context, model.encode_text(PROMPTS))


def test_an_older_checkpoint_with_text_encoder_keys_and_config_loads(compose_cfg, tmp_path):
    """Checkpoints written before the seam: model_config has `text_encoder`, weights are `text_encoder.*`."""
    cfg = compose_cfg([*TINY_LDM, "model.scale_factor=0.5"])
    config = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    model = hydra.utils.instantiate(config)
    with torch.no_grad():
        model.text_encoder.token_embedding.weight.add_(1.0)  # differs from what the config alone builds
    state = {k.replace("conditioner.embedders.0.", "text_encoder."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("text_encoder.transformer.") for k in state)
    old_config = {k: v for k, v in config.items() if k != "conditioner"}
    old_config["text_encoder"] = config["conditioner"]["embedders"]["0"]["module"]
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "model_config": old_config, "global_step": 1}, path)
    loaded = load_lightning_model(path)
    torch.testing.assert_close(
        loaded.text_encoder.token_embedding.weight, model.text_encoder.token_embedding.weight
    )
    torch.testing.assert_close(loaded.encode_text(PROMPTS), model.encode_text(PROMPTS))
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_state_keys_follow_sgm_layout():
    keys = tiny_model().state_dict()
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not any(k.startswith("text_encoder.") for k in keys)
