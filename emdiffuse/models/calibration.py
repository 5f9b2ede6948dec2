"""Calibrated uncertainty: the spread of N samples turned into per-voxel intervals that hold.

The pipeline writes, next to the mean of N samples, their per-voxel spread σ (the population
standard deviation over the N samples). On its own σ is no error bar: a model's samples are
usually too alike (the quality benchmark's ±2σ covered 16–82 % where 95 % was meant).
Split-conformal calibration (Angelopoulos & Bates 2021; Angelopoulos et al. 2022,
"Image-to-image regression with distribution-free uncertainty quantification") fixes the
scale on held-out data: at the end of training, N samples of held-out validation patches
give, per voxel, σ and the error ``|mean_N - truth|``; the score ``|error| / max(σ, floor)``
has a finite-sample conformal quantile ``q`` (:func:`conformal_quantile`) such that, for a
new exchangeable voxel, ``|error| <= q · max(σ, floor)`` with probability at least ``level``
(90 % by default). ``q`` and the setting it was fitted at are stored in the checkpoint
(``ModelConfig.calibration``); :func:`half_widths` turns a σ map into interval half-widths.
The same scores give ``q`` at the other usual levels (:data:`INTERVAL_LEVELS`), stored
beside it as ``scales``, so a run may ask for 68 %, 95 % or 99 % intervals of a model
calibrated at 90 % (:func:`at_level`) without refitting.

A run with another number of samples N than the calibration's Nc needs another scale: both
σ (estimated from N draws) and the mean's error (the mean of N draws) change with N. With
the sample mean and spread of Gaussian draws, ``|error| / σ`` is a scaled Student t with
N − 1 degrees of freedom, so the scale moves by :func:`spread_factor` ``c(N) / c(Nc)`` with
``c(N) = sqrt((A + 1/N) · N/(N - 1)) · t_{N-1}(level)`` where ``A`` (``excess``, measured at
calibration) is the error variance of the model's mean beyond its samples' spread. (The
mean bias of σ alone — E σ̂_N = b(N) σ — is not enough: in simulation it leaves 76 % coverage
at N = 2 and 96 % at N = 16 for a 90 % calibration at N = 4; this factor keeps 90 ± 0.5 %.)

Pure numpy, no torch: the pipeline's workers call :func:`half_widths` on blended σ maps.
Units: model space by default; pass ``scale`` (raw units per model unit, the target
normalisation's half range) when σ is in raw units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS, resolve_spacing

DEFAULT_LEVEL = 0.9
DEFAULT_SAMPLES = 4
# σ floor in model space (1/2000 of the [-1, 1] range): keeps scores finite where the
# samples agree exactly (a deterministic model gives q = the error quantile / floor, so
# its half-width q · floor is the plain conformal error bound)
DEFAULT_FLOOR = 1e-3
# the levels whose conformal scale every calibration record also stores (``scales``)
INTERVAL_LEVELS = (0.5, 0.68, 0.8, 0.9, 0.95, 0.99)


def conformal_quantile(scores: np.ndarray, level: float = DEFAULT_LEVEL) -> float:
    """The split-conformal quantile of calibration ``scores`` at ``level``: the
    ``ceil((n + 1) · level)``-th smallest of the n scores (``inf`` when that exceeds n).
    A new score exchangeable with these lies at or below it with probability ≥ ``level``."""
    if not 0 < level < 1:
        raise InputError(f"calibration level must be in (0, 1), got {level}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[~np.isnan(s)]
    n = s.size
    if n == 0:
        raise InputError("conformal calibration needs at least one score")
    k = math.ceil((n + 1) * level)
    if k > n:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


def t_quantile(level: float, dof: int) -> float:
    """The two-sided Student-t quantile: ``t`` with P(|T| <= t) = ``level`` for ``dof``
    (integer >= 1) degrees of freedom (Abramowitz & Stegun 26.7.3-4, then bisection)."""
    if dof < 1 or not 0 < level < 1:
        raise InputError(f"t_quantile needs dof >= 1 and level in (0, 1), got {dof}, {level}")

    def central(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(dof))
        c, s = math.cos(theta), math.sin(theta)
        if dof % 2:
            total, term = 0.0, c
            for j in range(1, (dof - 1) // 2 + 1):
                if j > 1:
                    term *= (2 * j - 2) / (2 * j - 1) * c * c
                total += term
            return (2 / math.pi) * (theta + s * total) if dof > 1 else 2 * theta / math.pi
        total, term = 1.0, 1.0
        for j in range(1, dof // 2):
            term *= (2 * j - 1) / (2 * j) * c * c
            total += term
        return s * total

    lo, hi = 0.0, 1.0
    while central(hi) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if central(mid) < level else (lo, mid)
    return 0.5 * (lo + hi)


def spread_factor(samples: int, level: float = DEFAULT_LEVEL, excess: float = 0.0) -> float:
    """``c(N)`` of the module docstring: the ``level`` quantile of ``|mean_N - truth| / σ_N``
    per unit of the samples' true spread, for Gaussian draws whose mean has ``excess``
    (error variance beyond the spread, relative to it) on top."""
    n = int(samples)
    if n < 2:
        raise InputError(f"a spread needs at least 2 samples, got {samples}")
    return math.sqrt((max(excess, 0.0) + 1.0 / n) * n / (n - 1)) * t_quantile(level, n - 1)


def fit(
    samples: np.ndarray,
    truth: np.ndarray,
    *,
    level: float = DEFAULT_LEVEL,
    floor: float = DEFAULT_FLOOR,
) -> dict[str, Any]:
    """Fit the conformal scale from N samples ``(N, ...)`` of held-out data and its
    ``truth`` ``(...)`` (model space). Returns the record stored as
    ``ModelConfig.calibration``: ``level``, ``scale`` (q), ``samples`` (N), ``floor``,
    ``excess`` (A), and for the record ``voxels``, ``coverage`` (on these data, ≥ level)
    and ``spearman`` (rank correlation of σ with the error)."""
    samples = np.asarray(samples, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    n = samples.shape[0]
    if n < 2:
        raise InputError(f"calibration needs at least 2 samples, got {n}")
    if samples.shape[1:] != truth.shape:
        raise InputError(f"samples {samples.shape} do not match truth {truth.shape}")
    if not floor > 0:
        raise InputError(f"calibration floor must be positive, got {floor}")
    mean = samples.mean(0)
    std = samples.std(0)  # population std, as the pipeline's uncertainty map
    record = _scale_record(mean, std, truth, level, floor)
    err = np.abs(mean - truth).ravel()
    variance = float(np.mean(np.maximum(std, floor) ** 2)) * n / (n - 1)
    excess = max(float(np.mean(err**2)) / variance - 1.0 / n, 0.0)
    return {**record, "samples": int(n), "excess": float(excess)}


def _scale_record(
    mean: np.ndarray, sigma: np.ndarray, truth: np.ndarray, level: float, floor: float
) -> dict[str, Any]:
    """The split-conformal scale of ``|mean - truth| / max(σ, floor)`` at ``level``, with
    its ``coverage`` on these data and the ``spearman`` of σ against the error."""
    err = np.abs(mean - truth).ravel()
    spread = np.maximum(sigma, floor).ravel()
    scores = err / spread
    q = conformal_quantile(scores, level)
    if not math.isfinite(q):
        raise InputError(
            f"too few calibration voxels ({err.size}) for level {level}; use more patches"
        )
    scales = {float(level): float(q)}
    for other in INTERVAL_LEVELS:  # a level the voxels are too few for is left out
        scales.setdefault(other, conformal_quantile(scores, other))
    return {
        "level": float(level),
        "scale": float(q),
        "floor": float(floor),
        "voxels": int(err.size),
        "coverage": float(np.mean(err <= q * spread)),
        "spearman": spearman(np.asarray(sigma).ravel(), err),
        "scales": [[lv, s] for lv, s in sorted(scales.items()) if math.isfinite(s)],
    }


def _stored_scales(record: Mapping[str, Any]) -> dict[float, float]:
    """Level -> scale of every level ``record`` holds (its own, and its ``scales``)."""
    stored = {float(record["level"]): float(record["scale"])}
    stored.update((float(lv), float(s)) for lv, s in record.get("scales") or ())
    return stored


def levels(record: Mapping[str, Any]) -> tuple[float, ...]:
    """The interval levels a calibration record holds a scale for (a record made before
    ``scales`` were stored: its own level only)."""
    return tuple(sorted(_stored_scales(record)))


def at_level(record: Mapping[str, Any], level: float) -> dict[str, Any]:
    """``record`` (a :func:`fit` or :func:`fit_mean` record, or a model's calibration with
    its ``mean_interval``) with its ``level`` and ``scale`` set to the stored ones at
    ``level``, so :func:`half_widths` and :func:`mean_half_widths` give intervals at that
    level. InputError when the record holds no scale there (it names the levels it holds)."""
    stored = _stored_scales(record)
    match = [lv for lv in stored if abs(lv - float(level)) < 1e-9]
    if not match:
        offered = ", ".join(f"{100 * lv:g} %" for lv in sorted(stored))
        raise InputError(
            f"the model's calibration holds intervals at {offered}, not at "
            f"{100 * float(level):g} %; choose one of those levels"
        )
    out = {**record, "level": match[0], "scale": stored[match[0]]}
    if "mean_interval" in record:
        out["mean_interval"] = at_level(record["mean_interval"], level)
    return out


def half_widths(
    std: np.ndarray,
    calibration: Mapping[str, Any],
    samples: int,
    *,
    scale: float = 1.0,
    ratio: float = 1.0,
) -> np.ndarray:
    """Interval half-widths at the calibration's level (:func:`at_level` picks another) from
    the spread ``std`` of ``samples`` draws (population std, as the pipeline writes it):
    ``q · max(ratio · std · c(N) / c(Nc), floor · scale)`` (module docstring). ``scale``: raw
    units per model unit when ``std`` is in raw units (the target normalisation's half
    range). ``ratio``: how much more samples drawn as the calibration was fitted spread than
    the ``std``'s sampling did (1: the same sampling;
    :func:`emdiffuse.pipeline.correlation.spread_ratio`).
    The interval is ``mean_N ± half-width``; it holds for about ``level`` of the voxels of
    data like the calibration's. float32."""
    n = int(samples)
    if n < 2:
        raise InputError(f"calibrated intervals need at least 2 samples, got {samples}")
    q = float(calibration["scale"])
    level = float(calibration["level"])
    nc = int(calibration["samples"])
    excess = float(calibration.get("excess", 0.0))
    factor = 1.0 if n == nc else spread_factor(n, level, excess) / spread_factor(nc, level, excess)
    floor = float(calibration["floor"]) * float(scale)
    std = np.asarray(std, dtype=np.float64)
    return (q * np.maximum(std * (factor * float(ratio)), floor)).astype(np.float32)


def fit_mean(
    mean: np.ndarray,
    sigma: np.ndarray,
    truth: np.ndarray,
    *,
    level: float = DEFAULT_LEVEL,
    floor: float = DEFAULT_FLOOR,
) -> dict[str, Any]:
    """Fit the conformal scale of an error head's ``sigma`` for the posterior ``mean`` of
    held-out data against its ``truth`` (all the same shape, model space): the score is
    ``|mean - truth| / max(σ, floor)``. Returns the record stored as
    ``calibration["mean_interval"]``: ``level``, ``scale`` (q), ``floor``, and for the record
    ``voxels``, ``coverage`` (on these data, ≥ level) and ``spearman`` (σ against the
    error). The interval ``mean ± q · max(σ, floor)`` then holds for about ``level`` of the
    voxels of like data, at one network evaluation (no samples)."""
    mean, sigma, truth = (np.asarray(a, dtype=np.float64) for a in (mean, sigma, truth))
    if not mean.shape == sigma.shape == truth.shape:
        raise InputError(f"mean {mean.shape}, sigma {sigma.shape} and truth {truth.shape} differ")
    if not floor > 0:
        raise InputError(f"calibration floor must be positive, got {floor}")
    return _scale_record(mean, sigma, truth, level, floor)


def mean_half_widths(
    sigma: np.ndarray, record: Mapping[str, Any], *, scale: float = 1.0
) -> np.ndarray:
    """Interval half-widths ``q · max(σ, floor · scale)`` of the posterior mean from an error
    head's ``sigma`` and its :func:`fit_mean` ``record``; ``scale`` as in
    :func:`half_widths`. float32."""
    q, floor = float(record["scale"]), float(record["floor"]) * float(scale)
    return (q * np.maximum(np.asarray(sigma, dtype=np.float64), floor)).astype(np.float32)


def fitted_sampling(calibration: Mapping[str, Any]) -> tuple[str, int, str]:
    """The (sampler, steps, spacing) a calibration record was fitted on; a record without
    them was fitted at the run defaults, as training fits it."""
    sampler = str(calibration.get("sampler", DEFAULT_SAMPLER))
    steps = int(calibration.get("steps", DEFAULT_STEPS))
    return sampler, steps, str(calibration.get("spacing") or resolve_spacing(sampler))


def residual_correlation(residuals: np.ndarray) -> float:
    """The correlation of the residual parts (sample minus the model's own mean) of N >= 2
    samples of the same inputs ``(N, ...)``, averaged over the pairs of samples and clipped
    to [0, 1]: 0 when the texture is pure noise, 1 when every sample draws the same one.
    Overlapping tiles draw their residuals independently but from the same content, so they
    correlate about this much; the pipeline's blend
    (:func:`emdiffuse.pipeline.blend.blend_parts`) uses it to keep the texture's variance
    in overlaps."""
    r = np.asarray(residuals, dtype=np.float64).reshape(len(residuals), -1)
    if len(r) < 2:
        raise InputError(f"a correlation needs at least 2 samples, got {len(r)}")
    norms = np.sqrt((r**2).sum(axis=1))
    if not (norms > 0).all():
        return 0.0
    gram = (r @ r.T) / np.outer(norms, norms)
    pairs = gram[np.triu_indices(len(r), k=1)]
    return float(np.clip(pairs.mean(), 0.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties), NaN without spread."""
    ra, rb = _ranks(np.asarray(a).ravel()), _ranks(np.asarray(b).ravel())
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    # average the ranks of ties
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


__all__ = [
    "DEFAULT_LEVEL", "DEFAULT_SAMPLES", "DEFAULT_FLOOR", "INTERVAL_LEVELS", "conformal_quantile",
    "t_quantile", "spread_factor", "fit", "half_widths", "fit_mean", "mean_half_widths",
    "levels", "at_level", "spearman", "residual_correlation", "fitted_sampling",
]  # fmt: skip
