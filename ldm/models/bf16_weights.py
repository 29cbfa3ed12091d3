"""bf16 weights with stochastic rounding: the UNet's parameters are stored in bfloat16 (half the memory of
fp32 weights, and bf16 gradients), each optimiser update is computed in fp32 and written back with stochastic
rounding, so updates smaller than bf16's resolution still move a weight on average (Gupta et al. 2015, "Deep
Learning with Limited Numerical Precision"; Zamirai et al. 2020, "Revisiting BFloat16 Training").

``model.bf16_weights=true`` turns it on (``use_bf16_weights`` on the UNet, ``StochasticRoundingOptimizer``
around the configured optimiser).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["StochasticRoundingOptimizer", "stochastic_round_to_bf16", "use_bf16_weights"]

_LOW_BITS = 1 << 16  # bf16 is the top 16 bits of an fp32


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) -> bf16, rounded up in magnitude with probability (distance to the lower bf16 neighbour) /
    (gap between the neighbours): E[result] = x. Adds uniform random integers to the 16 bits bf16 drops, then
    truncates them (the carry lands in the kept bits exactly when the dropped fraction plus the noise
    overflows)."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(
        0, _LOW_BITS, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    rounded = (bits + noise).bitwise_and_(-_LOW_BITS)  # -65536 == 0xFFFF0000 as int32
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def use_bf16_weights(module: nn.Module) -> nn.Module:
    """Store ``module``'s floating parameters and buffers in bf16 and make it take inputs in any float dtype:
    floating inputs are cast to bf16 on the way in and the output back to the first input's dtype."""
    module.to(torch.bfloat16)
    if getattr(module, "_casts_to_weight_dtype", False):
        return module

    def cast_inputs(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        first = next((a for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        mod._output_dtype = first.dtype if first is not None else None

        def cast(value: Any) -> Any:
            return value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point() else value

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def cast_output(mod: nn.Module, args: tuple, output: Any) -> Any:
        dtype = getattr(mod, "_output_dtype", None)
        return output.to(dtype) if dtype is not None and torch.is_tensor(output) else output

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    module.register_forward_hook(cast_output)
    module._casts_to_weight_dtype = True
    return module


class StochasticRoundingOptimizer(torch.optim.Optimizer):
    """Wraps any per-parameter optimiser (AdamW, Adafactor, SGD, ...) for low-precision weights: for each
    bf16/fp16 parameter the inner optimiser steps an fp32 copy (made for the step and freed after it, so only
    one parameter's fp32 copy exists at a time; the inner optimiser's states are fp32) and the result is
    written back with ``stochastic_round_to_bf16``. fp32 parameters step as usual.

    ``factory(params=[{"params": [...], **group options}])`` builds the inner optimiser (one per parameter).
    ``seed``: of the rounding noise -- the same on every rank, so DDP replicas stay identical. LR schedulers
    act on this object's ``param_groups``; ``lr`` is copied to the inner optimisers before each step.
    """

    def __init__(self, params: Iterable, factory: Callable[..., torch.optim.Optimizer], seed: int = 0):
        super().__init__(params, {})
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._slots: list[tuple[nn.Parameter, nn.Parameter, torch.optim.Optimizer, dict]] = []
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            group.setdefault("lr", getattr(factory, "keywords", {}).get("lr", 1e-3))
            for param in group["params"]:
                shadow = (
                    param
                    if param.dtype == torch.float32
                    else nn.Parameter(param.new_empty(0, dtype=torch.float32))
                )
                inner = factory(params=[{"params": [shadow], **options}])
                self._slots.append((param, shadow, inner, group))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def _step_one(
        self, param: nn.Parameter, shadow: nn.Parameter, inner: torch.optim.Optimizer, group: dict
    ) -> None:
        for inner_group in inner.param_groups:
            inner_group["lr"] = group["lr"]
        if shadow is param:
            inner.step()
            return
        shadow.data = param.detach().to(torch.float32)
        shadow.grad = param.grad.to(torch.float32)
        inner.step()
        param.copy_(stochastic_round_to_bf16(shadow, self._generator(param.device)).to(param.dtype))
        shadow.grad = None
        shadow.data = param.new_empty(0, dtype=torch.float32)

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, shadow, inner, group in self._slots:
            if param.grad is not None:
                self._step_one(param, shadow, inner, group)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": [inner.state_dict() for _, _, inner, _ in self._slots],
            "lrs": [g["lr"] for g in self.param_groups],
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["inner"]) != len(self._slots):
            raise ValueError(
                f"optimizer state for {len(state_dict['inner'])} parameters, this run has "
                f"{len(self._slots)}: resume with the same model and method settings"
            )
        for (_, _, inner, _), state in zip(self._slots, state_dict["inner"]):
            inner.load_state_dict(state)
        for group, lr in zip(self.param_groups, state_dict["lrs"]):
            group["lr"] = lr
        for key, value in state_dict.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(value)
