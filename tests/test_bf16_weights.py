"""bf16 weights with stochastic rounding (model.bf16_weights): the rounding is unbiased, updates below bf16's
resolution still move weights on average, and training with it lowers the loss (alone, fused into backward,
and through train.py)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.models.bf16_weights import StochasticRoundingOptimizer, stochastic_round_to_bf16, use_bf16_weights
from ldm.models.optimizers import OptimizerInBackward
from tests.conftest import ROOT


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.tensor([1.0 + 2**-9, -3.0 - 3 * 2**-8, 0.1, 1e-30, 12345.678])  # between bf16 grid points
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([stochastic_round_to_bf16(x, generator) for _ in range(20000)]).float()
    low, high = x.to(torch.bfloat16).float(), x.to(torch.bfloat16).float()
    for i, value in enumerate(x):  # the two bf16 neighbours of each value
        neighbours = set(draws[:, i].unique().tolist())
        assert len(neighbours) == 2, (float(value), neighbours)
        low[i], high[i] = min(neighbours), max(neighbours)
        assert low[i] <= value <= high[i]
    error = (draws.double().mean(0) - x.double()) / (high - low).double()
    assert error.abs().max() < 0.02, error  # ~4 standard errors of 20,000 draws
    nearest = x.to(torch.bfloat16).float()
    assert (nearest != x).all()  # round-to-nearest is biased for each of them


def test_an_update_below_bf16_resolution_moves_the_weight_on_average():
    def after_steps(stochastic: bool) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))  # bf16 spacing at 1.0: 2**-7
        sgd = functools.partial(torch.optim.SGD, lr=1e-3)
        optimizer = StochasticRoundingOptimizer([weight], sgd) if stochastic else sgd(params=[weight])
        for _ in range(10):
            weight.grad = torch.ones_like(weight)  # each step: -1e-3, an eighth of the spacing
            optimizer.step()
        return weight.detach().float()

    assert torch.equal(after_steps(False), torch.ones(4096))  # round-to-nearest loses every update
    moved = after_steps(True)
    assert abs(float(moved.mean()) - (1 - 1e-2)) < 1e-3


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(OmegaConf.load(ROOT / "conf/model/unet/tiny.yaml"))


def fit_losses(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 40) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(4, unet.in_channels, 8, 8, generator=generator)
    context = torch.randn(4, 7, unet.context_dim, generator=generator)
    target = torch.randn(z.shape, generator=generator)
    t = torch.tensor([10, 200, 500, 900])
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(unet(z, t, context), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_training_with_bf16_weights_lowers_the_loss_also_fused_into_backward():
    adamw = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)
    for fused in (False, True):
        unet = use_bf16_weights(tiny_unet())
        assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
        factory = functools.partial(StochasticRoundingOptimizer, factory=adamw)
        optimizer = (
            OptimizerInBackward(list(unet.parameters()), factory)
            if fused
            else factory(params=list(unet.parameters()))
        )
        losses = fit_losses(unet, optimizer, steps=20)
        assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
        assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    state = optimizer.state_dict()  # the inner optimisers' states are fp32, one per parameter
    assert len(state["inner"]) == len(list(unet.parameters()))


def test_resume_restores_the_rounding_noise_and_the_states():
    adamw = functools.partial(torch.optim.AdamW, lr=3e-3)
    unet = use_bf16_weights(tiny_unet())
    optimizer = StochasticRoundingOptimizer(list(unet.parameters()), adamw, seed=3)
    fit_losses(unet, optimizer, steps=2)
    weights, state = (
        {k: v.clone() for k, v in unet.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),
    )
    reference = fit_losses(unet, optimizer, steps=2)
    resumed_unet = use_bf16_weights(tiny_unet())
    resumed_unet.load_state_dict(weights)
    resumed = StochasticRoundingOptimizer(list(resumed_unet.parameters()), adamw, seed=3)
    resumed.load_state_dict(state)
    assert fit_losses(resumed_unet, resumed, steps=2) == reference


def test_config_toggle_trains_txt2img_with_bf16_weights(compose_cfg):
    from train import train

    cfg = compose_cfg(
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            "model/sampler=ddim",
            "model.sampler.steps=2",
            "callbacks.rich_progress_bar=null",
            "debug=smoke",
            "data.train_size=16",
            "data.val_size=4",
            "model.bf16_weights=true",
            "trainer.fast_dev_run=2",
        ]
    )
    _, objects = train(cfg)
    model, trainer = objects["model"], objects["trainer"]
    assert isinstance(trainer.optimizers[0], StochasticRoundingOptimizer)
    assert all(p.dtype == torch.bfloat16 for p in model.unet.parameters())
    assert trainer.global_step == 2
    images = model.generate(["a red circle on a blue background"], seed=0)  # fp32 latents in, fp32 out
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert Path(cfg.paths.output_dir).is_dir()
