"""The samplers' names, step spacings, defaults and network-evaluation counts, without torch.

The one list the pipeline, its plan and the CLI take their choices from (importing
:mod:`emdiffuse.models.samplers` would pull in torch, which the CLI and the plan do not need).
:mod:`emdiffuse.models.samplers` implements exactly these names; a test keeps them equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from emdiffuse.errors import InputError

# the default first, then the reference's ancestral sampler, then the others
SAMPLER_NAMES: tuple[str, ...] = ("dpmpp_2m", "ddpm", "ddim", "dpmpp_2m_sde", "dpmpp_3m_sde")
STOCHASTIC: frozenset[str] = frozenset({"ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde"})  # ddim if eta > 0
# The run default (pipeline, CLI, workflows): deterministic, so one starting noise gives one
# path, which is what a mean-plus-residual model fits its few-step schedule on (step_fit):
# 4 fitted steps land within 0.07 dB of its own 32-step solution
# (benchmarks/results/residual_nfe_ode_check_*.md).
DEFAULT_SAMPLER = "dpmpp_2m"
# ... at 8 logsnr steps, unless the model fitted its own few-step schedule for the sampler
# (then 4 steps on it: default_sampling, models/step_fit.py)
DEFAULT_STEPS = 8
# The fewest-evaluation setting that came within 0.3 dB and in texture of the reference's
# loop — ddpm over the reference's 1000-step test schedule (linear beta 1e-4..0.09), every
# sampler walking that schedule — on a tiny model of our default kind (v-prediction):
# benchmarks/results/sampler_quality.md (500 training steps, 16 tiles, one noise draw;
# dpmpp_2m_sde@10 was as close in texture, -0.17 +- 0.11 dB, short of the equivalence test).
# On a model trained the reference's way (eps-prediction, as the published weights) no
# setting at <= 10 evaluations matched (sampler_quality_reference_style.md).
REFERENCE_MATCH: tuple[str, int] = ("dpmpp_2m_sde", 8)
# how the steps are placed between the noisiest and the clean level (Schedule.timesteps):
# uniform in the schedule's time (the reference's), uniform in log-SNR, or Karras et al.'s
# rho = 7 spacing of sigma (denser at low noise)
SPACING_NAMES: tuple[str, ...] = ("time", "logsnr", "karras")
# a run may also walk the schedule its model fitted at the end of training (mean-plus-residual
# models, for the steps and sampler it was fitted at: models/step_fit.py)
FITTED = "fitted"
RUN_SPACINGS: tuple[str, ...] = (*SPACING_NAMES, FITTED)
DEFAULT_FIT_STEPS = 4  # the step count training fits a schedule for (train --fit-steps)
MAX_FIT_STEPS = 16  # more steps need no fitting: logsnr at 8 is already near the solution
_DEFAULT_SPACING = {"ddpm": "time"}  # the reference's sampler on the reference's schedule
# network evaluations per step: every sampler here is single-step or multistep (one call a step)
_EVALS_PER_STEP = dict.fromkeys(SAMPLER_NAMES, 1)


def check_sampler(sampler: str) -> str:
    """``sampler`` if it is known, else :class:`~emdiffuse.errors.InputError`."""
    if sampler not in SAMPLER_NAMES:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return sampler


def resolve_spacing(sampler: str, spacing: str | None = None) -> str:
    """``spacing``, or ``sampler``'s default when None: ``time`` for ddpm (the reference's
    schedule), ``logsnr`` for the others (far better at few steps). ``fitted`` (the model's
    own schedule) is checked against the model where it is loaded. Unknown names raise
    :class:`~emdiffuse.errors.InputError`."""
    check_sampler(sampler)
    if spacing is None:
        return _DEFAULT_SPACING.get(sampler, "logsnr")
    if spacing not in RUN_SPACINGS:
        raise InputError(f"unknown spacing {spacing!r}; choose one of {', '.join(RUN_SPACINGS)}")
    return spacing


def fitted_step_counts(step_schedules: Mapping[str, Any] | None, sampler: str) -> tuple[int, ...]:
    """The step counts a model's fitted schedules (its ``step_schedules`` record,
    :mod:`emdiffuse.models.step_fit`) hold for ``sampler``, ascending; none without a record
    or for another sampler."""
    if not step_schedules or step_schedules.get("sampler") != sampler:
        return ()
    return tuple(sorted(int(k) for k in step_schedules["schedules"]))


def default_sampling(
    sampler: str,
    steps: int | None,
    spacing: str | None,
    step_schedules: Mapping[str, Any] | None = None,
    start_noise: float | None = None,
) -> tuple[int, str]:
    """A run's ``(steps, spacing)``, the model's defaults filled in where they are None.

    A model that fitted step schedules for ``sampler`` (``step_schedules``) walks them by
    default: ``steps`` None is its fitted count (:data:`DEFAULT_FIT_STEPS` where it has it),
    and ``spacing`` None is ``fitted`` at any fitted count. Otherwise ``steps`` None is
    :data:`DEFAULT_STEPS` and ``spacing`` None the sampler's default
    (:func:`resolve_spacing`). A truncated start (``start_noise``) never takes a fitted
    schedule. Unknown names raise :class:`~emdiffuse.errors.InputError`; a ``fitted``
    spacing the model lacks is refused where the schedule is read."""
    check_sampler(sampler)
    counts = () if start_noise is not None else fitted_step_counts(step_schedules, sampler)
    if steps is None:
        if counts and spacing in (None, FITTED):
            steps = DEFAULT_FIT_STEPS if DEFAULT_FIT_STEPS in counts else counts[0]
        else:
            steps = DEFAULT_STEPS
    if spacing is None and int(steps) in counts:
        spacing = FITTED
    return int(steps), resolve_spacing(sampler, spacing)


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations (NFE) one sample of one tile costs: ``steps`` of ``sampler``."""
    return _EVALS_PER_STEP[check_sampler(sampler)] * int(steps)


def check_start_noise(start_noise: float | None, spacing: str) -> float | None:
    """``start_noise`` (σ where a residual sample starts: the noise's standard deviation
    relative to the residual's, which the model scales to about 1) as a float, or None
    (a full sample from pure noise). Refused (:class:`~emdiffuse.errors.InputError`) unless
    positive and finite, and with ``time`` spacing, which walks the training schedule's own
    points from its noisiest, or ``fitted``, whose start the model fitted."""
    if start_noise is None:
        return None
    try:
        value = float(start_noise)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(start_noise, bool) or not math.isfinite(value) or value <= 0:
        raise InputError(f"start_noise must be a positive number (σ, e.g. 2), got {start_noise!r}")
    if spacing in ("time", FITTED):
        raise InputError(f"start_noise needs logsnr or karras spacing, not {spacing} "
                         "(e.g. --spacing karras)")  # fmt: skip
    return value


def start_alpha_bar(start_noise: float) -> float:
    """The alpha-bar of the noise level σ = ``start_noise`` (σ² = (1 - a) / a)."""
    return 1.0 / (1.0 + float(start_noise) ** 2)


__all__ = [
    "SAMPLER_NAMES", "SPACING_NAMES", "FITTED", "RUN_SPACINGS", "STOCHASTIC",
    "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_FIT_STEPS", "MAX_FIT_STEPS",
    "REFERENCE_MATCH", "check_sampler", "resolve_spacing", "fitted_step_counts",
    "default_sampling", "network_evaluations", "check_start_noise", "start_alpha_bar",
]  # fmt: skip
