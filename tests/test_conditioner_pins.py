"""Outputs pinned across the conditioner refactor: the values below were computed on the code before the text
encoder became an embedder of ``ldm.modules.conditioner.Conditioner``; the same seeds must give the same bits
(training losses with condition dropout, sampled images with a negative prompt, trained weights of a txt2img,
a LoRA-on-the-text-encoder and a textual-inversion run)."""

from __future__ import annotations

import hashlib

import torch

from ldm.utils.batch_random import BatchRandom
from tests.test_latent_diffusion import TINY_LDM, tiny_model
from tests.test_train import tiny_overrides
from train import train


def digest(tensors) -> str:
    """SHA-256 (16 hex digits) of tensors' bytes, in the given order."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_digest(state: dict) -> str:
    return digest(state[k] for k in sorted(state))


def direct_fingerprint() -> dict[str, str]:
    torch.manual_seed(0)
    model = tiny_model(scale_factor=1.0, ucg_rate=0.5)
    with torch.no_grad():  # the zero-initialised output layer would make every prediction 0
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": images, "caption": ["a red circle on a blue background", "a green square", "a b", "x"]}
    losses = []
    for index in range(3):
        model._batch_random = BatchRandom.for_batch(7, index, 0, 1)
        z0, context = model.batch_latents_and_context(batch, train=True)
        losses.append(model.diffusion_step(z0, context, reduction="none").detach())
    model._batch_random = None
    samples = model.eval().generate(
        ["a red circle on a blue background", "a green square"], seed=3, negative_prompt="a blue circle"
    )
    return {"losses": digest(losses), "samples": digest([samples])}


def run_fingerprint(cfg, part: str) -> dict[str, str]:
    metrics, objects = train(cfg)
    model = objects["model"]
    state = model.unet.state_dict() if part == "unet" else model.method.state_dict()
    return {"loss": float(metrics["train/loss"]).hex(), "weights": state_digest(state)}


def test_direct_losses_and_samples_are_unchanged():
    assert direct_fingerprint() == {"losses": "e59ab8f14d8d895f", "samples": "4d82ed2729b1c375"}


def test_txt2img_run_is_unchanged(compose_cfg):
    # model/loss=eps: the loss this pin was taken with (experiment=txt2img's default is now v_min_snr)
    pinned = ["debug=fdr", "trainer.fast_dev_run=2", "model.ucg_rate=0.5", "model/loss=eps"]
    cfg = compose_cfg([*TINY_LDM, *pinned])
    assert run_fingerprint(cfg, "unet") == {"loss": "0x1.0b2e240000000p+0", "weights": "03bfc61870c254ac"}


def test_lora_on_the_text_encoder_run_is_unchanged(compose_cfg):
    cfg = compose_cfg(
        [
            *tiny_overrides("lora_finetune"),
            "debug=fdr",
            "trainer.fast_dev_run=2",
            "model.method.text_encoder_targets=[TEXT_ENCODER]",
            "model.ucg_rate=0.5",
            "model.scheduler.warmup_steps=0",
        ]
    )
    assert run_fingerprint(cfg, "method") == {"loss": "0x1.0b31c20000000p+0", "weights": "013b4fc7cbc02cfa"}


def test_textual_inversion_run_is_unchanged(compose_cfg):
    cfg = compose_cfg(
        [
            *tiny_overrides("textual_inversion_star"),
            "debug=fdr",
            "trainer.fast_dev_run=2",
            "model.ucg_rate=0.5",
            "model.scheduler.warmup_steps=0",
        ]
    )
    assert run_fingerprint(cfg, "method") == {"loss": "0x1.0b31c20000000p+0", "weights": "5402c82ee165d23d"}
