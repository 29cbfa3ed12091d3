"""Shared by the interoperability tests (test_interop_*.py): tiny random SD parts, every weight perturbed so
zero-initialised layers cannot hide a wrong mapping, and the hand-written CompVis single-file layout."""

from __future__ import annotations

import json
import os

import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from ldm.io.sd_keys import ema_key
from ldm.modules.text_encoder import CLIPTextEncoder
from ldm.modules.tiny_unet import tiny_unet_config

ATOL = 1e-5
HIDDEN, MAX_LEN = 32, 12
TINY_UNET = tiny_unet_config(attention_resolutions=[1], num_heads=2, context_dim=HIDDEN)
TINY_VAE = {
    "embed_dim": 4,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "resolution": 16,
    "norm_groups": 32,
}
TINY_TEXT = {"hidden_size": HIDDEN, "num_layers": 2, "num_heads": 2, "max_length": MAX_LEN}
PROMPT = "a red circle on a blue background"


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return module


def tiny_text_encoder(seed: int = 1) -> CLIPTextEncoder:
    return perturb(CLIPTextEncoder.tiny(**TINY_TEXT), seed, 0.02)


def unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 700])[:batch],
        torch.randn(batch, MAX_LEN, HIDDEN, generator=g),
    )


def image(batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


def ldm_layout_state(unet, ema, vae, text) -> dict[str, torch.Tensor]:
    """A single file as CompVis' LatentDiffusion saves it (written by hand from the module state dicts)."""
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({ema_key(k): v for k, v in ema.state_dict().items()})
    state["model_ema.num_updates"] = torch.tensor(100)
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.transformer.state_dict().items()})
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(MAX_LEN)[None]
    from ldm.diffusion import DiffusionSchedule

    state["betas"] = DiffusionSchedule.from_config().betas.float()
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


TINY_OVERRIDES = {
    "unet": TINY_UNET,
    "vae": TINY_VAE,
    "text_encoder": {
        "vocab_size": None,
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_LEN,
        "hidden_act": "quick_gelu",
    },
}


def tiny_overrides(text: CLIPTextEncoder) -> dict:
    overrides = json.loads(json.dumps(TINY_OVERRIDES))
    overrides["text_encoder"]["vocab_size"] = text.transformer.config.vocab_size
    return overrides


def assert_weights_equal(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
