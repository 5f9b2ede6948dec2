"""The demo's model: a small denoiser trained on synthetic EM in minutes on a CPU.

:func:`demo_pair` makes a (noisy, clean) synthetic pair, :func:`train_demo_denoiser` trains
on it with :data:`~emdiffuse.training.settings.DEMO_SETTINGS` through the shipping
:func:`~emdiffuse.training.trainer.train`, and :func:`evaluate_denoiser` scores a checkpoint
on held-out synthetic data. Used by ``emdiffuse demo``, the benchmarks and the tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from emdiffuse import metrics
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.training.degrade import add_poisson_gaussian_noise
from emdiffuse.training.settings import DEMO_NOISE, DEMO_SETTINGS, DEMO_STEPS_PER_MINUTE
from emdiffuse.training.state import latest_checkpoint, load_state
from emdiffuse.training.synthetic import synthetic_block
from emdiffuse.training.trainer import train

# The demo model's training volume (zyx voxels). Large enough to hold a representative sample
# of the generator's intensities: an MMSE denoiser at the demo's dose shrinks towards its
# training data's intensity distribution, and the first 8x256² (mean 0.60 against 0.62-0.65 in
# held-out regions) made every held-out output 1.4-3.3 % too dark
# (benchmarks/results/intensity_bias.md).
DEMO_TRAIN_SHAPE = (16, 512, 512)


def demo_pair(
    shape: tuple[int, int, int] = (8, 256, 256),
    *,
    origin: tuple[int, int, int] = (0, 0, 0),
    seed: int = 0,
    noise_seed: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (noisy, clean) pair of EM-like data, float32 raw units."""
    clean = np.asarray(synthetic_block(origin, shape, seed=seed), dtype=np.float32)
    noisy = add_poisson_gaussian_noise(clean, seed=noise_seed, **DEMO_NOISE)
    return np.asarray(noisy, dtype=np.float32), clean


def enhance_slices(
    enhancer: Enhancer,
    raw: np.ndarray,
    *,
    sampler: str = "ddim",
    steps: int = 4,
    samples: int = 1,
    seed: int = 0,
    eta: float = 0.0,
    batch: int = 2,
) -> np.ndarray:
    """Enhance the 2D slices of ``raw`` (z, y, x; sides multiples of ``enhancer.multiple``)
    with whole-slice tiles: raw -> model space with the condition range, back with the target
    range. ``samples`` 0: the one-evaluation posterior mean; N >= 1: the mean of N samples
    (seeded noise; stochastic samplers get keyed step noise)."""
    cond = enhancer.condition_normalization.forward(raw, clip=True)[:, None]
    total = np.zeros(cond.shape, dtype=np.float64)
    for n in range(max(samples, 1)):
        noise = np.random.default_rng([seed, n]).standard_normal(cond.shape).astype(np.float32)

        def step_noise(j: int, part: slice, n: int = n) -> np.ndarray:
            rng = np.random.default_rng([seed, n, 1 + j])
            return rng.standard_normal(cond.shape).astype(np.float32)[part]

        for i in range(0, len(cond), batch):
            part = slice(i, i + batch)
            if samples == 0:
                out = np.clip(enhancer.posterior_mean(cond[part], noise[part]), -1.0, 1.0)
            else:
                out = enhancer.enhance(
                    cond[part], noise[part], sampler=sampler, steps=steps, eta=eta,
                    step_noise=lambda j, part=part: step_noise(j, part),
                )  # fmt: skip
            total[part] += out
    return enhancer.normalization.inverse(total[:, 0] / max(samples, 1)).astype(np.float32)


def evaluate_denoiser(
    checkpoint: str | os.PathLike,
    noisy: np.ndarray,
    clean: np.ndarray,
    *,
    sampler: str = "ddim",
    steps: int = 4,
    samples: int = 1,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """PSNR/SSIM of the noisy input and of the enhanced output against ``clean`` (raw units,
    data range of ``clean``), slice by slice with whole-slice tiles, and the output's
    intensity bias ``mean(enhanced - clean) / range(clean)``. ``samples``: 0 for the
    posterior mean, N for the mean of N samples (:func:`enhance_slices`)."""
    enhancer = Enhancer.load(checkpoint, device=device, expect_task="denoise")
    m = enhancer.multiple
    z, h, w = noisy.shape
    h, w = h - h % m, w - w % m
    noisy, clean = noisy[:, :h, :w], clean[:, :h, :w]
    enhanced = enhance_slices(enhancer, noisy, sampler=sampler, steps=steps, samples=samples,
                              seed=seed)  # fmt: skip
    rng_ = float(clean.max() - clean.min())
    return {
        "psnr_noisy": metrics.psnr(noisy, clean, data_range=rng_),
        "psnr_enhanced": metrics.psnr(enhanced, clean, data_range=rng_),
        "ssim_noisy": metrics.ssim(noisy, clean, data_range=rng_),
        "ssim_enhanced": metrics.ssim(enhanced, clean, data_range=rng_),
        "bias": float(np.mean(enhanced.astype(np.float64) - clean)) / rng_,
    }


def train_demo_denoiser(
    out: str | os.PathLike,
    *,
    minutes: float = 5.0,
    seed: int = 0,
    shape: tuple[int, int, int] = DEMO_TRAIN_SHAPE,
    evaluate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    **overrides: Any,
) -> tuple[Path, dict[str, float]]:
    """Train the demo denoiser on synthetic data for about ``minutes`` (CPU) and measure it
    on held-out synthetic data (another region of the generator, other noise).

    Returns ``(checkpoint, report)``; ``report`` has ``psnr_noisy``, ``psnr_enhanced``,
    ``gain_db``, ``steps`` and ``seconds``.
    """
    noisy, clean = demo_pair(shape, seed=seed, noise_seed=seed + 1)
    settings = {**DEMO_SETTINGS, **overrides}
    steps = int(settings.pop("steps", max(50, round(DEMO_STEPS_PER_MINUTE * minutes))))
    t0 = time.perf_counter()
    path = train(
        "denoise",
        [noisy, clean],
        out,
        steps=steps,
        seed=seed,
        time_limit=minutes * 60.0,
        progress=progress,
        overwrite=overwrite,
        voxel_size=[8.0, 8.0, 8.0],
        **settings,
    )
    report: dict[str, float] = {"seconds": time.perf_counter() - t0}
    report["steps"] = int(load_state(latest_checkpoint(Path(out)))["step"])
    if evaluate:
        held_noisy, held_clean = demo_pair(
            (4, 128, 128), origin=(10_000, 5_000, 5_000), seed=seed, noise_seed=seed + 101
        )
        report.update(
            evaluate_denoiser(path, held_noisy, held_clean, steps=settings.get("val_steps", 4))
        )
        report["gain_db"] = report["psnr_enhanced"] - report["psnr_noisy"]
    return path, report


__all__ = ["DEMO_TRAIN_SHAPE", "demo_pair", "enhance_slices", "evaluate_denoiser", "train_demo_denoiser", "DEMO_SETTINGS", "DEMO_NOISE"]
