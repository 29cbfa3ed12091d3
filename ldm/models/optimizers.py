"""Optimisers beyond torch's: AdamW 8-bit (bitsandbytes), Prodigy, schedule-free AdamW and Lion (each an
optional package; a clear error names the pip command), and the optimiser step fused into the backward pass
(``OptimizerInBackward``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ldm.utils.logging import get_logger
from ldm.utils.optional import require

log = get_logger(__name__)


def adamw_8bit(params: Iterable, lr: float = 1e-4, weight_decay: float = 0.01, **kwargs: Any):
    """bitsandbytes' AdamW with 8-bit block-wise quantised states (Dettmers et al. 2022, "8-bit Optimizers via
    Block-wise Quantization")."""
    bnb = require(
        "bitsandbytes",
        "bitsandbytes",
        "model/optimizer=adamw8bit",
        "use model/optimizer=adafactor, which needs nothing more",
    )
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, **kwargs)


def prodigy(
    params: Iterable,
    lr: float = 1.0,
    betas: Sequence[float] = (0.9, 0.99),
    weight_decay: float = 0.01,
    d_coef: float = 1.0,
    use_bias_correction: bool = True,
    safeguard_warmup: bool = True,
    **kwargs: Any,
):
    """Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"): Adam
    whose step size d is estimated on the fly; ``lr`` multiplies d (1.0 as the authors use it, ``d_coef``
    scales the estimate). ``safeguard_warmup`` and ``use_bias_correction`` as kohya and OneTrainer recommend
    for diffusion fine-tunes with a warm-up."""
    module = require("prodigyopt", "prodigyopt", "model/optimizer=prodigy")
    if lr < 0.1:
        log.warning(
            f"Prodigy lr={lr}: Prodigy's lr multiplies the step size it estimates (1.0 is usual); an "
            "experiment's AdamW lr was probably kept: pass model.optimizer.lr=1.0"
        )
    return module.Prodigy(
        params,
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        d_coef=d_coef,
        use_bias_correction=use_bias_correction,
        safeguard_warmup=safeguard_warmup,
        **kwargs,
    )


def schedulefree_adamw(
    params: Iterable,
    lr: float = 1e-4,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    **kwargs: Any,
):
    """Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled"): no learning-rate schedule; the
    weights to evaluate (x, an average) differ from the ones gradients are taken at (y), so the optimiser has
    ``train()`` / ``eval()`` modes. The LightningModule switches them (``ldm.models.optimizer_modes``)."""
    module = require("schedulefree", "schedulefree", "model/optimizer=schedulefree_adamw")
    return module.AdamWScheduleFree(
        params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs
    )


def lion(
    params: Iterable,
    lr: float = 3e-5,
    betas: Sequence[float] = (0.9, 0.99),
    weight_decay: float = 0.1,
    **kwargs: Any,
):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated
    momentum, one state tensor per parameter; its updates are larger than AdamW's, so lr ~3-10x smaller and
    weight decay ~3-10x larger than AdamW's (the paper's advice)."""
    module = require("lion_pytorch", "lion-pytorch", "model/optimizer=lion")
    return module.Lion(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kwargs)


class OptimizerInBackward(torch.optim.Optimizer):
    """The optimiser step fused into backward: each parameter is updated by its own inner optimiser as soon as
    its gradient is accumulated, and the gradient is freed right away, so the full set of gradients never
    exists at once (saves about the size of the trainable parameters; PyTorch's "optimizer in backward"
    recipe).

    Exact for per-parameter optimisers (Adam/AdamW/SGD/Adafactor): a run equals the plain optimiser's. Not
    compatible with gradient clipping over all parameters or gradient accumulation. ``step(closure)`` only
    runs the closure (forward + backward, where the updates happen); LR schedulers act on this object's
    ``param_groups``, whose ``lr`` is copied to the inner optimisers before each update.
    """

    def __init__(self, params: Iterable, factory: Callable[..., torch.optim.Optimizer]):
        super().__init__(params, {})
        self.inner: list[torch.optim.Optimizer] = []
        self._hooks = []
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            group.setdefault("lr", getattr(factory, "keywords", {}).get("lr", 1e-3))
            for p in group["params"]:
                inner = factory(params=[{"params": [p], **options}])  # group keys such as 'name' allowed
                self.inner.append(inner)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._update(group, inner)))

    @staticmethod
    def _update(group: dict, inner: torch.optim.Optimizer) -> Callable[[nn.Parameter], None]:
        def hook(param: nn.Parameter) -> None:
            for inner_group in inner.param_groups:
                inner_group["lr"] = group["lr"]
            inner.step()
            inner.zero_grad(set_to_none=True)

        return hook

    def step(self, closure: Callable | None = None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None  # every gradient was freed in backward

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [o.state_dict() for o in self.inner], "lrs": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["inner"]) != len(self.inner):
            raise ValueError(
                f"optimizer state for {len(state_dict['inner'])} parameters, this run has "
                f"{len(self.inner)}: resume with the same model and method settings"
            )
        for inner, state in zip(self.inner, state_dict["inner"]):
            inner.load_state_dict(state)
        for group, lr in zip(self.param_groups, state_dict["lrs"]):
            group["lr"] = lr

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
