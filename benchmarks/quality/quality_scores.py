"""Scores of one output on one level, on both axes of quality (DESIGN.md), and the
calibration of the uncertainty map.

Fidelity: PSNR and SSIM against the truth. Texture and resolution: the radial power-spectrum
error over the upper half of frequencies (``emdiffuse.metrics.spectrum_error``, as in
``benchmarks/sampler_quality.py``; 0 = the truth's texture, smooth outputs score high) and the
FRC resolution (1/7 threshold) against the truth and between two independent
reconstructions. Intensity bias: ``mean(output - truth)`` as a percentage of the truth's
range (its 0.5-99.5 percentile span over the scored voxels; issue 14 asks for at most 1 %).

Intensities are the clean volume's [0, 1] scale (``data_range = 1``), outputs unclipped.
Only ``eval_z`` slices are scored (isotropic: the slices between the input slices, since
the input slices are copied unchanged by every method).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from emdiffuse import metrics

FRC_THRESHOLD = 1.0 / 7.0
RELIABILITY_BINS = 12
COVERAGE_TARGET, COVERAGE_TOL = 0.90, 0.03  # issue 14: empirical coverage 90 % ± 3 %
SPEARMAN_TARGET = 0.5
RANKING_WINDOW = 16  # voxels: blocks for the regional Spearman (160 nm on FlyEM, 128 nm synthetic)
GAUSS_90 = float(stats.norm.ppf(0.95))  # ±1.645 σ: a Gaussian 90 % interval


def resolution_nm(freq: float, voxel_nm: float) -> float:
    """FRC crossing (cycles per voxel) as a resolution in nm (voxel / frequency)."""
    return voxel_nm / freq if freq > 0 else math.inf


def truth_range(truth: np.ndarray) -> float:
    """The span of the truth that the bias is measured against (0.5-99.5 percentiles)."""
    lo, hi = np.percentile(truth, (0.5, 99.5))
    return float(hi - lo)


def score(estimate: np.ndarray, truth: np.ndarray, eval_z: np.ndarray, voxel_nm: float,
          pair: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
    """PSNR, SSIM, FRC 1/7 resolution, spectrum error and bias against ``truth``; with
    ``pair`` (a second, independent reconstruction) also the FRC resolution between the
    two."""
    est, ref = estimate[eval_z].astype(np.float64), truth[eval_z].astype(np.float64)
    freq = metrics.frc_resolution(est, ref, threshold=FRC_THRESHOLD)
    out = {
        "psnr": metrics.psnr(est, ref, data_range=1.0),
        "ssim": metrics.ssim(est, ref, data_range=1.0),
        "frc_truth_freq": freq,
        "frc_truth_nm": resolution_nm(freq, voxel_nm),
        "spectrum_error": metrics.spectrum_error(est, ref),
        "bias_pct": 100.0 * float(np.mean(est - ref)) / truth_range(ref),
    }
    if pair is not None:
        pf = metrics.frc_resolution(est, pair[eval_z], threshold=FRC_THRESHOLD)
        out.update(frc_pair_freq=pf, frc_pair_nm=resolution_nm(pf, voxel_nm))
    return out


def frc_curve(estimate: np.ndarray, truth: np.ndarray, eval_z: np.ndarray) -> dict[str, list]:
    """The FRC curve against the truth (for the JSON and plots)."""
    freqs, corr = metrics.frc(estimate[eval_z], truth[eval_z])
    return {"freq": freqs.tolist(), "frc": corr.tolist()}


def uncertainty_scores(mean: np.ndarray, unc: np.ndarray, truth: np.ndarray, eval_z: np.ndarray,
                       meaning: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """How well the written uncertainty map predicts the actual error |mean - truth|.

    ``meaning`` (from the image's attributes): a ``half-width`` at a stated ``level`` (a
    calibrated checkpoint: the interval is mean ± the map) or the sample ``std`` (the
    interval is the Gaussian one at 90 %, mean ± 1.645 σ). Returns the empirical
    ``coverage`` of that interval with its ``nominal`` level, Spearman and Pearson of the map
    against |error|, the old coverage of ± 2σ (std maps only), the reliability curve, and
    whether the issue's targets (90 % ± 3 %, Spearman ≥ 0.5) are met; and, since one voxel's
    error is one noisy draw, Spearman over ``RANKING_WINDOW``² blocks and what a perfect map
    of the same values would score, per voxel and per block
    (:func:`emdiffuse.metrics.uncertainty_ranking`).
    """
    meaning = meaning or {"kind": "std"}
    m, u, t = mean[eval_z], unc[eval_z], truth[eval_z]
    base = metrics.calibration(m, u, t, k=2.0)  # pearson, spearman, ±2 coverage, mean, rmse
    error = np.abs(m - t)
    if meaning.get("kind") == "half-width":
        nominal = float(meaning["level"])
        coverage = float(np.mean(error <= u))
        interval = f"mean ± half-width ({nominal:.0%}, calibrated)"
        two_sigma = None
    else:
        nominal = COVERAGE_TARGET
        coverage = float(np.mean(error <= GAUSS_90 * u))
        interval = "mean ± 1.645 σ (Gaussian 90 %, uncalibrated std)"
        two_sigma = base["coverage"]
    curve = metrics.reliability(m, u, t, bins=RELIABILITY_BINS)
    ranking = metrics.uncertainty_ranking(m, u, t, window=RANKING_WINDOW)
    return {
        "map": meaning.get("kind", "std"), "meaning": meaning, "interval": interval,
        "nominal": nominal, "coverage": coverage, "coverage_2sigma": two_sigma,
        "spearman": base["spearman"], "pearson": base["pearson"],
        "mean_map": base["mean_std"], "rmse": base["rmse"],
        "coverage_met": abs(coverage - COVERAGE_TARGET) <= COVERAGE_TOL
        and abs(nominal - COVERAGE_TARGET) < 1e-6,
        "spearman_met": bool(np.isfinite(base["spearman"]) and base["spearman"] >= SPEARMAN_TARGET),
        "reliability": {k: v.tolist() for k, v in curve.items()},
        "spearman_window": ranking["spearman_window"], "ranking_window": ranking["window"],
        "spearman_ceiling": ranking["ceiling"],
        "spearman_window_ceiling": ranking["ceiling_window"],
    }  # fmt: skip
