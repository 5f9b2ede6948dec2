"""Step schedules fitted to a model: where a few deterministic steps should sit.

A deterministic sampler follows the model's probability-flow ODE; with few steps, where the
steps sit decides how far its sample lands from the ODE's own solution. The generic
spacings waste steps on a mean-plus-residual model: its residual is scaled to about unit
variance, so at 4 ``logsnr`` steps the noisiest evaluation (σ ≈ 150) sees no residual at all
and the cleanest (σ ≈ 0.02) changes almost nothing, and the sample lands near the mean — the
texture a sample exists for is lost (``benchmarks/results/residual_nfe.md``).

:func:`fit_sigmas` chooses the noise levels σ = sqrt((1 - a) / a) of an n-step schedule
for one model: on held-out patches it minimises the root-mean-square distance of the
n-step sample to a fine solution (:data:`REFERENCE_STEPS` ``logsnr`` steps of the same
sampler) from the same starting noise, by Nelder–Mead over log σ, started at the ``logsnr``
spacing — so on the fitting patches the result is never farther than that spacing's. The
idea is the one of "Align Your Steps" (Sabour et al., 2024): a schedule optimised for the
model and the data, at no change to the network. The trainer fits one at the end of
training (``TrainSettings.fit_steps``) and stores it in ``ModelConfig.step_schedules``; a
run walks it with ``spacing="fitted"``.

Pure torch (and scipy's optimiser, loaded only to fit); units: model space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.sampler_names import fitted_step_counts

FIT_SAMPLER = "dpmpp_2m"  # deterministic: the same noise gives the same path, fit or run
REFERENCE_STEPS = 32  # the fine solution's logsnr steps (a Gaussian field: within 1 % of exact)
EVALS_PER_STEP = 20  # Nelder–Mead budget: this many objective evaluations per free σ
FIT_PATCHES = 4  # held-out patches the trainer fits on (at most its calibration patches)


def alphas_from_sigmas(sigmas: Sequence[float]) -> torch.Tensor:
    """(n + 1,) float64 ascending alpha-bar of the noise levels ``sigmas`` (descending),
    ending at 1.0 (clean): the form every sampler walks."""
    sig = [float(s) for s in sigmas]
    return torch.tensor([1.0 / (1.0 + s * s) for s in sig] + [1.0], dtype=torch.float64)


def sigmas_from_alphas(alphas: torch.Tensor) -> list[float]:
    """The noise levels σ of an alpha-bar schedule, without its final clean point."""
    a = torch.as_tensor(alphas, dtype=torch.float64)[:-1]
    return [float(v) for v in ((1 - a) / a).sqrt()]


def fit_sigmas(
    sample: Callable[[torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    reference: torch.Tensor,
    *,
    max_evals: int | None = None,
) -> dict[str, Any]:
    """The noise levels of ``len(initial) - 1`` steps that bring ``sample(alphas)`` closest
    to ``reference`` (a fine solution from the same starting noise).

    ``sample``: runs the deterministic sampler on the fitting batch over an alpha-bar
    schedule (:func:`alphas_from_sigmas`'s form). ``initial``: the schedule the search
    starts at (the ``logsnr`` spacing); its noisiest and cleanest σ bound the search (the
    network was trained between them). ``max_evals``: objective evaluations (default
    :data:`EVALS_PER_STEP` per step). Returns ``{"sigmas", "rms", "rms_logsnr"}``: the
    fitted σ (descending) and the RMS distance to ``reference`` of it and of ``initial``.
    """
    start = sigmas_from_alphas(initial)
    n = len(start)
    if n < 1:
        raise InputError("a fitted schedule needs at least one step")
    hi, lo = math.log(start[0]), math.log(max(start[-1], 1e-6))
    reference = reference.float()

    def place(log_sigma: np.ndarray) -> list[float]:
        # descending, inside the trained range, no two equal (the samplers need a strict order)
        ordered = np.sort(np.clip(log_sigma, lo, hi))[::-1]
        ordered = ordered - 1e-6 * np.arange(n)
        return [math.exp(v) for v in ordered]

    def rms(sigmas: Sequence[float]) -> float:
        out = sample(alphas_from_sigmas(sigmas)).float()
        return float(((out - reference) ** 2).mean().sqrt())

    from scipy.optimize import minimize  # noqa: PLC0415 (only training fits; runs need not load it)

    x0 = np.log(np.asarray(start, dtype=np.float64).clip(min=1e-6))
    budget = int(max_evals or EVALS_PER_STEP * n)
    result = minimize(lambda v: rms(place(v)), x0, method="Nelder-Mead",
                      options={"maxfev": budget, "xatol": 0.01, "fatol": 1e-5})  # fmt: skip
    fitted, start_rms = place(result.x), rms(start)
    best = float(result.fun)
    if best > start_rms:  # the search never moved below its start: keep the start
        fitted, best = start, start_rms
    return {"sigmas": fitted, "rms": best, "rms_logsnr": start_rms}


def fitted_alphas(record: Mapping[str, Any] | None, sampler: str, steps: int, describe: str) -> torch.Tensor:
    """The alpha-bar schedule a model's ``step_schedules`` ``record`` holds for ``sampler``
    at ``steps``; :class:`InputError` (what the model has instead) when it holds none."""
    if record is None:
        raise InputError(
            f"spacing 'fitted' needs a model trained with a fitted step schedule; {describe} has "
            "none (retrain with --fit-steps, or use logsnr or karras spacing)"
        )
    if int(steps) not in fitted_step_counts(record, sampler):
        have = fitted_step_counts(record, record["sampler"])
        offers = ", ".join(f"{record['sampler']}@{k}" for k in have)
        raise InputError(
            f"{describe} has fitted step schedules for {offers}, not {sampler}@{steps}; use one "
            "of those (--sampler, --steps) or another spacing"
        )
    return alphas_from_sigmas(record["schedules"][str(int(steps))]["sigmas"])


__all__ = [
    "FIT_SAMPLER", "REFERENCE_STEPS", "EVALS_PER_STEP", "FIT_PATCHES", "alphas_from_sigmas",
    "sigmas_from_alphas", "fit_sigmas", "fitted_alphas",
]  # fmt: skip
