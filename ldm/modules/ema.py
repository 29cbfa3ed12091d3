"""Exponential moving average of a module's weights (Polyak averaging), kept as a frozen copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``self.module`` is a frozen copy of the source; ``update(source)`` moves it toward the source.

    decay_t = min(decay, (1 + n) / (10 + n)) with n updates so far (LDM's ``LitEma`` warm-up), so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, source: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(source).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        src_params = [p.detach() for p in source.parameters()]
        floating = [(e, s) for e, s in zip(ema_params, src_params) if e.dtype.is_floating_point]
        if floating:
            torch._foreach_lerp_([e for e, _ in floating], [s.to(e.dtype) for e, s in floating], 1.0 - decay)
        for e, s in zip(self.module.buffers(), source.buffers()):
            e.copy_(s)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:  # the average is never in training mode
        return super().train(False)


class ParameterEMA:
    """EMA of a list of parameters (a fine-tuning method's, not a whole module): ``update(params)`` moves the
    averages toward the live values; ``swap(params)`` exchanges live and average values in place (call it
    twice to restore). Same warm-up as ``EMA``. ``device``: where the averages live -- ``"cpu"`` keeps them
    out of accelerator memory (a full SD UNet's EMA is 3.4 GB); None follows the parameters' device."""

    def __init__(
        self,
        params: list[nn.Parameter],
        decay: float = 0.999,
        warmup: bool = True,
        device: str | torch.device | None = None,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup, self.device = decay, warmup, device
        self.shadows = [p.detach().to(device or p.device, copy=True) for p in params]
        self.num_updates = 0

    @property
    def count(self) -> int:
        return len(self.shadows)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _follow(self, params: list[nn.Parameter]) -> None:
        if len(params) != self.count:
            raise ValueError(f"ParameterEMA tracks {self.count} parameters, got {len(params)}")
        if self.device is None:  # the model moved (e.g. to the GPU after setup): the averages follow
            self.shadows = [s.to(p.device) for s, p in zip(self.shadows, params)]

    @torch.no_grad()
    def update(self, params: list[nn.Parameter]) -> None:
        self._follow(params)
        live = [p.detach().to(s.device, s.dtype) for p, s in zip(params, self.shadows)]
        torch._foreach_lerp_(self.shadows, live, 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def swap(self, params: list[nn.Parameter]) -> None:
        self._follow(params)
        for p, s in zip(params, self.shadows):
            live = p.detach().clone()
            p.copy_(s.to(p.device))
            s.copy_(live.to(s.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow_{i}": s for i, s in enumerate(self.shadows)}
        return {**state, "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) - 1 != self.count or "num_updates" not in state:
            raise ValueError(f"EMA state with {len(state) - 1} averages, this run tracks {self.count}")
        for i, s in enumerate(self.shadows):
            s.copy_(state[f"shadow_{i}"])
        self.num_updates = int(state["num_updates"])
