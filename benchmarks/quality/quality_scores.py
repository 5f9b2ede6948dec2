"""Scores of one method on one level: PSNR, SSIM and FRC resolution (against the ground
truth and between two independent reconstructions), and the calibration of uncertainty.

Intensities are the clean volume's [0, 1] scale (``data_range = 1``), outputs unclipped.
Only ``eval_z`` slices are scored (isotropic: the slices between the input slices, since
the input slices are copied unchanged by every method).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from quality_data import VOXEL_NM

from emdiffuse import metrics

FRC_THRESHOLD = 1.0 / 7.0
RELIABILITY_BINS = 12


def resolution_nm(freq: float) -> float:
    """FRC crossing (cycles per voxel) as a resolution in nm (voxel / frequency)."""
    return VOXEL_NM / freq if freq > 0 else math.inf


def score(
    estimate: np.ndarray, truth: np.ndarray, eval_z: np.ndarray, pair: np.ndarray | None = None
) -> dict[str, float]:
    """PSNR, SSIM and FRC 1/7 resolution against ``truth``; with ``pair`` (a second,
    independent reconstruction) also the FRC resolution between the two."""
    est, ref = estimate[eval_z], truth[eval_z]
    freq = metrics.frc_resolution(est, ref, threshold=FRC_THRESHOLD)
    out = {
        "psnr": metrics.psnr(est, ref, data_range=1.0),
        "ssim": metrics.ssim(est, ref, data_range=1.0),
        "frc_truth_freq": freq,
        "frc_truth_nm": resolution_nm(freq),
    }
    if pair is not None:
        pf = metrics.frc_resolution(est, pair[eval_z], threshold=FRC_THRESHOLD)
        out.update(frc_pair_freq=pf, frc_pair_nm=resolution_nm(pf))
    return out


def frc_curve(estimate: np.ndarray, truth: np.ndarray, eval_z: np.ndarray) -> dict[str, list]:
    """The FRC curve against the truth (for the JSON and plots)."""
    freqs, corr = metrics.frc(estimate[eval_z], truth[eval_z])
    return {"freq": freqs.tolist(), "frc": corr.tolist()}


def calibration(
    mean: np.ndarray, std: np.ndarray, truth: np.ndarray, eval_z: np.ndarray
) -> dict[str, Any]:
    """Correlation of predicted std with |mean - truth|, coverage of mean ± 2σ and the
    reliability curve (binned std against RMSE)."""
    m, s, t = mean[eval_z], std[eval_z], truth[eval_z]
    out: dict[str, Any] = metrics.calibration(m, s, t, k=2.0)
    curve = metrics.reliability(m, s, t, bins=RELIABILITY_BINS)
    out["reliability"] = {k: v.tolist() for k, v in curve.items()}
    return out
