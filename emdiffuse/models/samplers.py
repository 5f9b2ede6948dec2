"""Samplers: plain functions over a denoiser ``denoise(x_t, alpha_bar) -> x0_hat``.

Every sampler is ``f(denoise, x_T, alphas, *, step_noise=None, callback=None, ...) -> x0`` where
``alphas`` is
an ascending alpha-bar sequence of length ``n + 1`` ending at 1.0 (clean), as given by
:meth:`emdiffuse.models.diffusion.Schedule.timesteps`; ``x_T`` is the initial standard-normal
noise (the caller derives it from global coordinates). Stochastic samplers draw the noise of
step ``i`` (0-based, ``i < n``) from ``step_noise(i)`` only — there is no hidden generator — and
raise :class:`~emdiffuse.errors.InputError` without it.

``callback`` (as in k-diffusion) is called after every step ``i`` with a dict: ``i`` (0-based
step), ``x`` (the sample after the step), ``denoised`` (the x0 estimate of this step),
``alpha_bar`` (the noise level that estimate was made at) and ``alpha_bar_next`` (the level
``x`` is at now; 1.0 after the last step). It sees the sampler's own tensors: read them,
do not modify them. For progress bars, previews and debugging; results do not depend on it.

Precision: samplers do arithmetic in float32 on whatever ``denoise`` returns; mixed precision
(bf16/fp16 autocast on GPU) is the caller's job around ``denoise`` (the Enhancer does it).
``samples=N``: :func:`sample_many` returns the mean and per-voxel standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.diffusion import Schedule, as_schedule
from emdiffuse.models.sampler_names import SAMPLER_NAMES, resolve_spacing

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
StepNoise = Callable[[int], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def _check_alphas(alphas: torch.Tensor) -> list[float]:
    a = [float(v) for v in torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)]
    if len(a) < 2:
        raise InputError("alphas needs at least 2 values (one step)")
    if not all(0 < v <= 1 for v in a) or any(a[i + 1] <= a[i] for i in range(len(a) - 1)):
        raise InputError("alphas must be in (0, 1] and strictly increasing (less noise each step)")
    return a


def _noise(step_noise: StepNoise | None, i: int, like: torch.Tensor, name: str) -> torch.Tensor:
    if step_noise is None:
        raise InputError(
            f"sampler {name} is stochastic and needs step_noise(i) (noise keyed on global "
            "coordinates); pass it, or use a deterministic sampler (ddim with eta=0, dpmpp_2m)"
        )
    z = torch.as_tensor(step_noise(i)).to(device=like.device, dtype=like.dtype)
    if z.shape != like.shape:
        raise InputError(
            f"step_noise({i}) has shape {tuple(z.shape)}, expected {tuple(like.shape)}"
        )
    return z


def _eps(x: torch.Tensor, x0: torch.Tensor, a: float) -> torch.Tensor:
    return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


def _report(
    callback: Callback | None, i: int, x: torch.Tensor, x0: torch.Tensor, at: float, ap: float
) -> None:
    """The per-step callback (module docstring)."""
    if callback is not None:
        callback({"i": i, "x": x, "denoised": x0, "alpha_bar": at, "alpha_bar_next": ap})


def ddpm_posterior(at: float, ap: float) -> tuple[float, float, float]:
    """``(c0, ct, var)`` of the posterior q(x_prev | x_t, x0) from alpha-bar ``at`` to the
    less noisy ``ap``: mean ``c0 x0 + ct x_t``, variance ``var``, with ``beta = 1 - at / ap``
    — the reference's ``posterior_mean_coef1``, ``posterior_mean_coef2`` and posterior
    variance (which it stores clipped below at 1e-20, and uses only where ``var > 0``)."""
    alpha = at / ap
    beta = 1 - alpha
    c0 = math.sqrt(ap) * beta / (1 - at)
    ct = (1 - ap) * math.sqrt(alpha) / (1 - at)
    return c0, ct, beta * (1 - ap) / (1 - at)


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas: torch.Tensor,
    *,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (the reference's sampler).

    With ``alphas`` the reference's test schedule (``gammas`` reversed, then 1.0: what
    ``Schedule.timesteps(steps)`` gives at the schedule's full length) and a denoiser that
    clips x0 to [-1, 1] (``make_denoiser``'s default, the reference's ``clip_denoised``)
    this is the reference's ``restoration`` loop step for step: x0 from the ε estimate, the
    posterior mean of :func:`ddpm_posterior`, plus ``sqrt(var)`` times the step's noise; the
    last step (to alpha-bar 1) adds none (``tests/models/test_reference_import.py`` replays
    the reference's own loop to 1e-5).
    """
    a = _check_alphas(alphas)
    x = x_T.float()
    for i in range(len(a) - 1):
        at, ap = a[i], a[i + 1]
        x0 = denoise(x, at).float()
        c0, ct, var = ddpm_posterior(at, ap)
        x = c0 * x0 + ct * x
        if i < len(a) - 2 and var > 0:
            x = x + math.sqrt(var) * _noise(step_noise, i, x, "ddpm")
        _report(callback, i, x, x0, at, ap)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas: torch.Tensor,
    *,
    step_noise: StepNoise | None = None,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al.): ``eta = 0`` deterministic, ``eta = 1`` ~ ancestral; noise only if eta > 0."""
    if eta < 0:
        raise InputError(f"eta {eta!r} must be >= 0")
    a = _check_alphas(alphas)
    x = x_T.float()
    for i in range(len(a) - 1):
        at, ap = a[i], a[i + 1]
        x0 = denoise(x, at).float()
        eps = _eps(x, x0, at)
        sigma = eta * math.sqrt(max((1 - ap) / (1 - at) * (1 - at / ap), 0.0))
        x = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(step_noise, i, x, "ddim")
        _report(callback, i, x, x0, at, ap)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas: torch.Tensor,
    *,
    step_noise: StepNoise | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), data-prediction form: deterministic second-order multistep.

    In log-SNR ``lambda = 0.5 log(a / (1 - a))``, with ``h`` the step in lambda, each step is
    ``x' = (s'/s) x - sqrt(a') expm1(-h) D`` where ``s = sqrt(1 - a)`` and ``D`` is the x0
    estimate, extrapolated linearly from the last two (first step and last step first-order).
    """
    del step_noise
    a = _check_alphas(alphas)
    x = x_T.float()
    old, h_last = None, None
    for i in range(len(a) - 1):
        at, ap = a[i], a[i + 1]
        x0 = denoise(x, at).float()
        if ap >= 1.0:
            x = x0
            _report(callback, i, x, x0, at, ap)
            break
        lam, lam_next = 0.5 * math.log(at / (1 - at)), 0.5 * math.log(ap / (1 - ap))
        h = lam_next - lam
        d = x0
        if old is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
        x = math.sqrt((1 - ap) / (1 - at)) * x - math.sqrt(ap) * math.expm1(-h) * d
        old, h_last = x0, h
        _report(callback, i, x, x0, at, ap)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas: torch.Tensor,
    *,
    step_noise: StepNoise | None = None,
    eta: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE variant (midpoint form): stochastic, noise from ``step_noise``."""
    a = _check_alphas(alphas)
    x = x_T.float()
    old, h_last = None, None
    for i in range(len(a) - 1):
        at, ap = a[i], a[i + 1]
        x0 = denoise(x, at).float()
        if ap >= 1.0:
            x = x0
            _report(callback, i, x, x0, at, ap)
            break
        lam, lam_next = 0.5 * math.log(at / (1 - at)), 0.5 * math.log(ap / (1 - ap))
        h = lam_next - lam
        eh = eta * h
        x = (math.sqrt((1 - ap) / (1 - at)) * math.exp(-eh) * x
             - math.sqrt(ap) * math.expm1(-h - eh) * x0)  # fmt: skip
        if old is not None:
            r = h_last / h
            x = x - math.sqrt(ap) * 0.5 * math.expm1(-h - eh) * (1 / r) * (x0 - old)
        if eta > 0:
            x = x + math.sqrt(1 - ap) * math.sqrt(-math.expm1(-2 * eh)) * _noise(
                step_noise, i, x, "dpmpp_2m_sde"
            )
        old, h_last = x0, h
        _report(callback, i, x, x0, at, ap)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas: torch.Tensor,
    *,
    step_noise: StepNoise | None = None,
    eta: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``): stochastic third-order
    multistep in log-SNR, noise from ``step_noise``; ``eta = 0`` gives the 3M ODE solver.

    With ``h`` the step in ``lambda = 0.5 log(a / (1 - a))`` and ``g = (1 + eta) h``, each step
    is ``x' = (s'/s) e^(-eta h) x + sqrt(a') [(1 - e^(-g)) D + phi2 D1 - phi3 D2]
    + s' sqrt(1 - e^(-2 eta h)) z`` with ``s = sqrt(1 - a)``, ``D`` the x0 estimate and
    ``D1, D2`` its first and second divided differences over the last three steps (first
    step first-order, second step second-order; the last step returns ``D``).
    """
    if eta < 0:
        raise InputError(f"eta {eta!r} must be >= 0")
    a = _check_alphas(alphas)
    x = x_T.float()
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in range(len(a) - 1):
        at, ap = a[i], a[i + 1]
        x0 = denoise(x, at).float()
        if ap >= 1.0:
            x = x0
            _report(callback, i, x, x0, at, ap)
            break
        h = 0.5 * math.log(ap / (1 - ap)) - 0.5 * math.log(at / (1 - at))
        g = (1 + eta) * h
        sa = math.sqrt(ap)
        x = math.sqrt((1 - ap) / (1 - at)) * math.exp(-eta * h) * x - sa * math.expm1(-g) * x0
        phi2 = math.expm1(-g) / g + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (x0 - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + sa * (phi2 * d1 - (phi2 / g - 0.5) * d2)
        elif h_1 is not None:
            x = x + sa * phi2 * (x0 - d_1) / (h_1 / h)
        if eta > 0:
            x = x + math.sqrt(1 - ap) * math.sqrt(-math.expm1(-2 * eta * h)) * _noise(
                step_noise, i, x, "dpmpp_3m_sde"
            )
        d_1, d_2 = x0, d_1
        h_1, h_2 = h, h_1
        _report(callback, i, x, x0, at, ap)
    return x


# name -> implementation; the names themselves are listed once, in sampler_names
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}
if set(SAMPLERS) != set(SAMPLER_NAMES):  # the torch-free list must name exactly these
    raise RuntimeError("emdiffuse.models.sampler_names.SAMPLER_NAMES is out of date")
_SDE = {"dpmpp_2m_sde", "dpmpp_3m_sde"}  # eta = 0 given to sample() means their default, 1


def sample(
    denoise: Denoiser,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    sampler: str,
    steps: int,
    step_noise: StepNoise | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    callback: Callback | None = None,
    noisiest: float | None = None,
    alphas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``sampler`` for ``steps`` steps on ``schedule.timesteps(steps, spacing, noisiest)``,
    or on ``alphas`` where given (``steps + 1`` values: a model's fitted schedule,
    :func:`emdiffuse.models.step_fit.fitted_alphas`).

    ``spacing`` (one of ``sampler_names.SPACING_NAMES``; None: the sampler's default,
    ``"time"`` for ddpm — the reference's schedule — and ``"logsnr"`` for the others, far
    better at few steps). ``callback``: called after each step (module docstring).
    ``noisiest``: where ``logsnr``/``karras`` spacings start at the latest (see
    :meth:`~emdiffuse.models.diffusion.Schedule.timesteps`); ``time`` spacing ignores it.
    """
    if alphas is None:
        alphas = as_schedule(schedule).timesteps(steps, resolve_spacing(sampler, spacing), noisiest)
    elif len(alphas) != steps + 1:
        raise InputError(f"alphas has {len(alphas)} values; {steps} steps need {steps + 1}")
    fn = SAMPLERS[sampler]
    kwargs: dict[str, Any] = {"step_noise": step_noise, "callback": callback}
    if sampler == "ddim":
        kwargs["eta"] = eta
    elif sampler in _SDE:
        kwargs["eta"] = 1.0 if eta == 0 else eta
    return fn(denoise, x_T, alphas, **kwargs)


def sample_many(
    denoise: Denoiser,
    noises: Sequence[torch.Tensor],
    schedule: Schedule,
    *,
    sampler: str,
    steps: int,
    step_noises: Sequence[StepNoise | None] | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    callback: Callback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one sample per initial noise; return (mean, per-voxel std) over the draws.

    N = ``len(noises)`` >= 1; the std (unbiased=False, population) is zero for N = 1.
    ``callback`` is called after every step of every draw (the draws run one after another).
    """
    if len(noises) < 1:
        raise InputError("sample_many needs at least one initial noise")
    if step_noises is None:
        step_noises = [None] * len(noises)
    if len(step_noises) != len(noises):
        raise InputError("step_noises must have one entry per initial noise")
    draws = [
        sample(
            denoise,
            n,
            schedule,
            sampler=sampler,
            steps=steps,
            step_noise=s,
            eta=eta,
            spacing=spacing,
            callback=callback,
        )
        for n, s in zip(noises, step_noises, strict=True)
    ]
    stack = torch.stack(draws)
    return stack.mean(0), stack.std(0, correction=0)


__all__ = [
    "SAMPLERS", "Callback", "sample", "sample_many", "ddpm_posterior", "sample_ddpm", "sample_ddim",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
]  # fmt: skip
