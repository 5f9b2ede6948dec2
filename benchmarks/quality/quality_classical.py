"""Classical baselines: Gaussian filter and non-local means (denoise), nearest and bicubic
upsampling (super-resolve), nearest, linear and cubic interpolation along z (isotropic).

The free parameter of each denoising filter is chosen by PSNR on training slices (the same
training data the learned methods get), never on the test volume.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.interpolate import make_interp_spline
from skimage.restoration import denoise_nl_means

from emdiffuse import metrics

GAUSS_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0)
NLM_H = (0.5, 0.7, 0.9, 1.1, 1.4, 1.8, 2.4)  # h as a multiple of the estimated noise sigma
NLM_PATCH = ((5, 6), (7, 9), (9, 11))  # (patch size, patch distance)


def gaussian(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter in y and x of every slice."""
    return ndimage.gaussian_filter(stack.astype(np.float32), (0, sigma, sigma), mode="reflect")


def noise_sigma(image: np.ndarray) -> float:
    """Gaussian noise sigma of a 2D image from its response to a Laplacian-difference mask
    that cancels smooth structure (Immerkaer 1996, "Fast noise variance estimation")."""
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    response = ndimage.convolve(image.astype(np.float64), mask)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.mean(np.abs(response)) / 6.0)


def nlm(stack: np.ndarray, h: float, patch: tuple[int, int]) -> np.ndarray:
    """Non-local means (scikit-image, fast mode) of every slice, ``h`` in units of the
    slice's estimated noise sigma (:func:`noise_sigma`)."""
    out = []
    for image in stack.astype(np.float64):
        sigma = noise_sigma(image)
        out.append(denoise_nl_means(image, h=h * sigma, sigma=sigma, patch_size=patch[0],
                                    patch_distance=patch[1], fast_mode=True))  # fmt: skip
    return np.asarray(out, dtype=np.float32)


def tune_denoisers(noisy: np.ndarray, clean: np.ndarray) -> dict[str, dict]:
    """Best Gaussian sigma and NLM (h, patch) by PSNR on training slices ``noisy``/``clean``."""
    t0 = time.perf_counter()
    gauss = max(GAUSS_SIGMAS, key=lambda s: metrics.psnr(gaussian(noisy, s), clean))
    t1 = time.perf_counter()
    best = max(itertools.product(NLM_H, NLM_PATCH),
               key=lambda hp: metrics.psnr(nlm(noisy, *hp), clean))  # fmt: skip
    t2 = time.perf_counter()
    return {
        "gaussian": {"sigma": gauss, "grid": list(GAUSS_SIGMAS), "tune_seconds": t1 - t0},
        "nlm": {"h_over_sigma": best[0], "patch_size": best[1][0], "patch_distance": best[1][1],
                "grid_h": list(NLM_H), "grid_patch": [list(p) for p in NLM_PATCH],
                "tune_seconds": t2 - t1},
    }  # fmt: skip


def nearest_xy(low: np.ndarray, k: int) -> np.ndarray:
    """Each low-resolution pixel repeated k x k times (the input on the output grid)."""
    return np.repeat(np.repeat(low, k, axis=-2), k, axis=-1).astype(np.float32)


def bicubic_xy(low: np.ndarray, k: int) -> np.ndarray:
    """Bicubic upsampling by k in y and x (pixel-centre aligned, as the model's condition)."""
    t = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))[:, None]
    up = F.interpolate(t, scale_factor=k, mode="bicubic", align_corners=False)
    return up[:, 0].numpy()


def interpolate_z(slices: np.ndarray, k: int, kind: str) -> np.ndarray:
    """The volume with k x as many z-slices ((n-1)k+1) from ``slices`` k apart: input slice i
    becomes slice i*k; the others by ``kind`` = nearest | linear | cubic (spline) in z."""
    n = len(slices)
    z_in = np.arange(n) * k
    z_out = np.arange((n - 1) * k + 1)
    if kind == "nearest":
        return slices[np.clip(np.rint(z_out / k).astype(int), 0, n - 1)].astype(np.float32)
    degree = {"linear": 1, "cubic": 3}[kind]
    spline = make_interp_spline(z_in, slices.astype(np.float64), k=degree, axis=0)
    return spline(z_out).astype(np.float32)
