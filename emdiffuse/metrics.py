"""Image-quality metrics over numpy arrays: fidelity (PSNR, SSIM) and texture (FRC, spectrum).

Small pure functions, reused by the trainer's validation and the benchmarks. Every function
takes an estimate and a reference of the same shape (2D images, or stacks of them with the
image axes last) and a ``data_range`` (max - min of the intensity scale: 2.0 in model space
[-1, 1], 1.0 for [0, 1] data).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from emdiffuse.errors import InputError


def _pair(estimate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(estimate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"metric: shapes differ, {a.shape} vs {b.shape}; compare equal shapes")
    if a.size == 0:
        raise InputError("metric: empty arrays")
    return a, b


def mse(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared error."""
    a, b = _pair(estimate, reference)
    return float(np.mean((a - b) ** 2))


def psnr(estimate: np.ndarray, reference: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range² / MSE)``; ``inf`` if identical."""
    err = mse(estimate, reference)
    if err == 0.0:
        return math.inf
    return float(10.0 * math.log10(float(data_range) ** 2 / err))


# SSIM's Gaussian window (Wang et al. 2004): sigma in voxels, and the side of
# scikit-image's window at that sigma (truncated at 3.5 sigma): 11
GAUSSIAN_SIGMA = 1.5
GAUSSIAN_WINDOW = 2 * int(3.5 * GAUSSIAN_SIGMA + 0.5) + 1


def ssim(estimate: np.ndarray, reference: np.ndarray, *, data_range: float = 1.0) -> float:
    """Mean structural similarity (scikit-image, Gaussian window as Wang et al. 2004).

    Stacks (``ndim > 2``) are scored image by image over the last two axes and averaged.
    Images smaller than the Gaussian window (11 voxels) use a uniform window of the largest
    odd side up to 7 that fits (at least 3).
    """
    a, b = _pair(estimate, reference)
    if a.ndim < 2:
        raise InputError(f"ssim: need images (…, y, x), got shape {a.shape}")
    a2 = a.reshape(-1, *a.shape[-2:])
    b2 = b.reshape(-1, *b.shape[-2:])
    side = min(a.shape[-2:])
    small = side < GAUSSIAN_WINDOW  # too small for the Gaussian window: a uniform one
    scores = [
        structural_similarity(
            x,
            y,
            data_range=float(data_range),
            gaussian_weights=not small,
            sigma=GAUSSIAN_SIGMA,
            use_sample_covariance=False,
            win_size=max(3, min(7, side - (1 - side % 2))) if small else None,
        )
        for x, y in zip(a2, b2, strict=True)
    ]
    return float(np.mean(scores))


def _radial_index(shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Integer ring index of every frequency of an (h, w) FFT, and the number of rings
    up to Nyquist of the shorter side."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    radius = np.sqrt(fy**2 + fx**2)  # cycles per pixel, 0 .. ~0.707
    n_rings = min(h, w) // 2
    ring = np.floor(radius * 2 * n_rings).astype(np.int64)  # ring n covers [n, n+1)/(2 n_rings)
    return ring, n_rings


def frc(estimate: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two 2D images (or stacks, averaged over the stack).

    Returns ``(frequencies, correlation)``: ring centres in cycles per pixel (0 .. 0.5) and
    the normalised cross-correlation of the two spectra in each ring (1 = identical).
    """
    a, b = _pair(estimate, reference)
    if a.ndim < 2:
        raise InputError(f"frc: need images (…, y, x), got shape {a.shape}")
    ring, n_rings = _radial_index(a.shape[-2:])
    fa = np.fft.fft2(a.reshape(-1, *a.shape[-2:]))
    fb = np.fft.fft2(b.reshape(-1, *b.shape[-2:]))
    keep = ring < n_rings
    idx = ring[keep]
    cross = np.zeros(n_rings)
    pa = np.zeros(n_rings)
    pb = np.zeros(n_rings)
    for x, y in zip(fa, fb, strict=True):
        xs, ys = x[keep], y[keep]
        cross += np.bincount(idx, weights=np.real(xs * np.conj(ys)), minlength=n_rings)
        pa += np.bincount(idx, weights=np.abs(xs) ** 2, minlength=n_rings)
        pb += np.bincount(idx, weights=np.abs(ys) ** 2, minlength=n_rings)
    denom = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, cross / np.where(denom > 0, denom, 1.0), 1.0)
    freqs = (np.arange(n_rings) + 0.5) / (2 * n_rings)
    return freqs, corr


def radial_power_spectrum(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a 2D image (or stack, averaged).

    Returns ``(frequencies, power)`` with frequencies in cycles per pixel (0 .. 0.5).
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim < 2:
        raise InputError(f"power spectrum: need images (…, y, x), got shape {a.shape}")
    ring, n_rings = _radial_index(a.shape[-2:])
    keep = ring < n_rings
    idx = ring[keep]
    power = np.zeros(n_rings)
    stack = a.reshape(-1, *a.shape[-2:])
    for x in stack:
        spec = np.abs(np.fft.fft2(x - x.mean())) ** 2 / x.size
        power += np.bincount(idx, weights=spec[keep], minlength=n_rings)
    counts = np.bincount(idx, minlength=n_rings).astype(np.float64)
    power /= np.maximum(counts, 1.0) * len(stack)
    freqs = (np.arange(n_rings) + 0.5) / (2 * n_rings)
    return freqs, power


def spectrum_error(
    estimate: np.ndarray, reference: np.ndarray, *, band: tuple[float, float] = (0.25, 0.5)
) -> float:
    """Radial power-spectrum error: mean |log10 P_est - log10 P_ref| over the frequency band
    ``band`` (cycles per pixel; default the upper half, 0.25..0.5). 0 = same texture;
    1 = a tenfold power difference on average. Smooth (over-regularised) outputs score high.
    """
    a, b = _pair(estimate, reference)
    freqs, pa = radial_power_spectrum(a)
    _, pb = radial_power_spectrum(b)
    sel = (freqs >= band[0]) & (freqs <= band[1])
    if not sel.any():
        raise InputError(f"spectrum_error: no frequencies in band {band}")
    tiny = 1e-20
    return float(np.mean(np.abs(np.log10(pa[sel] + tiny) - np.log10(pb[sel] + tiny))))


def frc_resolution(
    estimate: np.ndarray, reference: np.ndarray, *, threshold: float = 1.0 / 7.0
) -> float:
    """The first frequency (cycles per pixel) where the FRC drops below ``threshold``
    (0.5 if it never does). Higher is better."""
    freqs, corr = frc(estimate, reference)
    below = np.nonzero(corr < threshold)[0]
    return float(freqs[below[0]]) if below.size else 0.5


def calibration(
    mean: np.ndarray, std: np.ndarray, truth: np.ndarray, *, k: float = 2.0
) -> dict[str, float]:
    """How well an uncertainty map (per-voxel ``std`` of samples around ``mean``) predicts
    the actual error ``|mean - truth|``.

    Returns ``pearson`` and ``spearman`` (correlation of std and error over voxels; NaN
    when either is constant), ``coverage`` (fraction of voxels with ``truth`` inside
    ``mean ± k·std``; 0.954 would be Gaussian-calibrated for k = 2), ``mean_std`` and
    ``rmse``.
    """
    from scipy import stats  # lazy: scipy.stats takes about a second to import; only here

    m, t = _pair(mean, truth)
    s, _ = _pair(std, truth)
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise InputError("calibration: std must be finite and >= 0")
    error = np.abs(m - t).ravel()
    s = s.ravel()
    constant = bool(np.ptp(s) == 0 or np.ptp(error) == 0)
    return {
        "pearson": math.nan if constant else float(np.corrcoef(s, error)[0, 1]),
        "spearman": math.nan if constant else float(stats.spearmanr(s, error)[0]),
        "coverage": float(np.mean(error <= k * s)),
        "mean_std": float(np.mean(s)),
        "rmse": float(np.sqrt(np.mean(error**2))),
    }


def _block_rms(values: np.ndarray, window: int) -> np.ndarray:
    """Root mean square over non-overlapping ``window``² blocks of each image (last two
    axes, cropped to whole blocks), flattened."""
    y, x = values.shape[-2] // window * window, values.shape[-1] // window * window
    v = values[..., :y, :x].reshape(*values.shape[:-2], y // window, window, x // window, window)
    return np.sqrt(np.mean(v**2, axis=(-3, -1))).ravel()


def uncertainty_ranking(
    mean: np.ndarray, std: np.ndarray, truth: np.ndarray, *, window: int = 16, seed: int = 0
) -> dict[str, float]:
    """Whether a larger uncertainty value marks a larger error, voxel by voxel and region by
    region, with the best score such a map could reach.

    A single voxel's error is one draw: even a perfect map (the error is Gaussian with
    exactly the map's ``std``) ranks it only loosely, the less so the less ``std`` varies.
    So besides the per-voxel ``spearman`` (of ``std`` against ``|mean - truth|``) this
    returns ``spearman_window``: the same over non-overlapping ``window``² blocks (voxels;
    last two axes) of RMS ``std`` against RMS error; and ``ceiling`` / ``ceiling_window``:
    both scores of the perfect map, whose errors are drawn (seeded by ``seed``) as
    ``std · N(0, 1)``. NaN where a compared quantity is constant.
    """
    from scipy import stats  # lazy, as in calibration

    m, t = _pair(mean, truth)
    s, _ = _pair(std, truth)
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise InputError("uncertainty_ranking: std must be finite and >= 0")
    if int(window) < 1 or min(s.shape[-2:]) < int(window):
        raise InputError(
            f"uncertainty_ranking: window must be 1..{min(s.shape[-2:])} voxels, got {window}"
        )
    error = np.abs(m - t)
    drawn = s * np.random.default_rng(seed).standard_normal(s.shape)

    def rank(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.ravel(), b.ravel()
        return math.nan if np.ptp(a) == 0 or np.ptp(b) == 0 else float(stats.spearmanr(a, b)[0])

    w = int(window)
    return {
        "spearman": rank(s, error),
        "spearman_window": rank(_block_rms(s, w), _block_rms(error, w)),
        "ceiling": rank(s, np.abs(drawn)),
        "ceiling_window": rank(_block_rms(s, w), _block_rms(drawn, w)),
        "window": w,
    }


def reliability(
    mean: np.ndarray, std: np.ndarray, truth: np.ndarray, *, bins: int = 10
) -> dict[str, np.ndarray]:
    """Reliability curve of an uncertainty map: voxels binned by predicted ``std`` (equal-
    count bins, quantiles of std), and per bin the mean predicted std and the actual RMSE of
    ``mean`` against ``truth``. A calibrated map lies on the diagonal.

    Returns arrays ``std``, ``rmse`` and ``count`` (one value per non-empty bin).
    """
    m, t = _pair(mean, truth)
    s, _ = _pair(std, truth)
    if int(bins) < 1:
        raise InputError(f"reliability: bins must be >= 1, got {bins}")
    s, sq = s.ravel(), ((m - t) ** 2).ravel()
    edges = np.quantile(s, np.linspace(0.0, 1.0, int(bins) + 1))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, int(bins) - 1)
    count = np.bincount(which, minlength=int(bins)).astype(np.float64)
    keep = count > 0
    mean_std = np.bincount(which, weights=s, minlength=int(bins))[keep] / count[keep]
    rmse = np.sqrt(np.bincount(which, weights=sq, minlength=int(bins))[keep] / count[keep])
    return {"std": mean_std, "rmse": rmse, "count": count[keep].astype(np.int64)}


__all__ = [
    "mse",
    "psnr",
    "ssim",
    "frc",
    "frc_resolution",
    "radial_power_spectrum",
    "spectrum_error",
    "calibration",
    "reliability",
    "uncertainty_ranking",
]
