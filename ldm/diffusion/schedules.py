"""Noise schedules and the closed-form algebra of the DDPM forward process.

Notation: ``abar_t = prod_{s<=t} (1 - beta_s)`` (``alphas_cumprod``), ``x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4). Timesteps are integers in ``[0, T-1]``.
Nothing here has ``nn.Parameter``s; the tables are float64 and every method gathers the
per-timestep coefficient, casts it to the input's dtype/device and reshapes it to broadcast. What a network
predicts (eps / v / x0) and its conversions live in ``ldm.diffusion.parameterization``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.discretization import OUR_CONVENTION, TimestepConvention


def make_beta_schedule(
    kind: str,
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Betas, float64 ``[T]``.

    ``"linear"``: ``linspace(start, end)`` (Ho et al. 2020). ``"scaled_linear"``:
    ``linspace(sqrt(start), sqrt(end)) ** 2``, Stable Diffusion v1 (CompVis' LDM configs call
    this one ``linear``). ``"cosine"``: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear', 'scaled_linear' or 'cosine'")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale ``sqrt(abar)`` so that ``abar_{T-1} = 0`` while ``abar_0`` is unchanged.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.
    The last beta becomes 1: pair it with v (or x0) prediction, eps is undefined at SNR 0.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def posterior_coefficients(abar_t, abar_prev):
    """Coefficients of q(x_prev | x_t, x0) between any two noise levels ``abar_t < abar_prev``.

    Ho et al. 2020, eq. 6-7 with ``beta = 1 - abar_t / abar_prev`` (also the respaced form of
    Nichol & Dhariwal 2021, sec. 4). Returns ``(coef_x0, coef_xt, variance)`` with
    ``mean = coef_x0 * x0 + coef_xt * x_t``. Works on floats or tensors; ``abar_prev = 1``
    (the clean end) gives ``mean = x0``, ``variance = 0``.
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    coef_x0 = abar_prev**0.5 * beta / (1 - abar_t)
    coef_xt = alpha**0.5 * (1 - abar_prev) / (1 - abar_t)
    variance = beta * (1 - abar_prev) / (1 - abar_t)
    return coef_x0, coef_xt, variance


class DiffusionSchedule:
    """Discrete VP diffusion schedule (no ``nn.Parameter``s, device-agnostic).

    Attributes are float64 torch tensors ``[T]``: ``betas``, ``alphas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev``, ``posterior_variance``, ``posterior_log_variance_clipped``,
    ``posterior_mean_coef1`` (x0), ``posterior_mean_coef2`` (x_t). Methods take ``t`` as a
    LongTensor ``[B]`` and return tensors broadcastable to ``x`` (``[B, 1, ..., 1]``).
    ``convention``: the model's timestep convention, which samplers use unless told otherwise.
    """

    convention: TimestepConvention = OUR_CONVENTION

    def __init__(self, betas: Tensor, convention: TimestepConvention | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        coef1, coef2, variance = posterior_coefficients(self.alphas_cumprod, self.alphas_cumprod_prev)
        self.posterior_mean_coef1, self.posterior_mean_coef2 = coef1, coef2
        self.posterior_variance = variance
        # variance[0] == 0: clip the log like DDPM by reusing variance[1]
        clipped = variance.clone()
        clipped[0] = variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.convention = convention or OUR_CONVENTION
        self._device_tables: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def from_config(
        cls,
        kind: str = "scaled_linear",
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
        zero_terminal_snr: bool = False,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        set_alpha_to_one: bool | None = None,
    ) -> DiffusionSchedule:
        """Betas from ``make_beta_schedule``; ``timestep_spacing``/``steps_offset``/``set_alpha_to_one``
        replace fields of the default ``TimestepConvention`` (ours: trailing, 0, True)."""
        betas = make_beta_schedule(kind, num_timesteps, linear_start, linear_end, cosine_s)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, OUR_CONVENTION.replace(timestep_spacing, steps_offset, set_alpha_to_one))

    def __repr__(self) -> str:
        abar = self.alphas_cumprod
        return (
            f"{type(self).__name__}(num_timesteps={self.num_timesteps}, "
            f"alphas_cumprod=[{abar[0].item():.5g} .. {abar[-1].item():.5g}], convention={self.convention})"
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_device_tables"] = {}
        return state

    # -- gathering ---------------------------------------------------------------------------

    def _table(self, name: str, device: torch.device) -> Tensor:
        """Table ``name`` on ``device`` (cached; float32 on backends without float64)."""
        key = str(device)
        tables = self._device_tables.setdefault(key, {})
        if name not in tables:
            table = getattr(self, name)
            if device.type == "mps":
                table = table.float()
            tables[name] = table.to(device)
        return tables[name]

    def _gather(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """``name[t]`` as ``x.dtype`` on ``x.device``, shaped ``[B, 1, ..., 1]``."""
        t = torch.as_tensor(t, device=x.device).long().reshape(-1)
        values = self._table(name, x.device)[t].to(x.dtype)
        return values.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    # -- forward process --------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
        return (
            self._gather("sqrt_alphas_cumprod", t, x0) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` shaped to broadcast with ``x``: ``x_t = a x0 + s eps``; the
        parameterisations (``ldm.diffusion.parameterization``) write their targets and conversions with
        them."""
        return self._gather("sqrt_alphas_cumprod", t, x), self._gather("sqrt_one_minus_alphas_cumprod", t, x)

    def snr(self, t: Tensor) -> Tensor:
        """abar_t / (1 - abar_t), float32 ``[B]`` on ``t``'s device."""
        t = torch.as_tensor(t).long().reshape(-1)
        abar = self._table("alphas_cumprod", t.device)[t]
        return (abar / (1 - abar)).float()

    def posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7): mean (like x), variance and clipped log
        variance, both ``[B, 1, ..., 1]``."""
        mean = (
            self._gather("posterior_mean_coef1", t, xt) * x0
            + self._gather("posterior_mean_coef2", t, xt) * xt
        )
        variance = self._gather("posterior_variance", t, xt)
        log_variance = self._gather("posterior_log_variance_clipped", t, xt)
        return mean, variance, log_variance
