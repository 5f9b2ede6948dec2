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
from emdiffuse.models.normalization import denormalize, normalize
from emdiffuse.training.degrade import add_poisson_gaussian_noise
from emdiffuse.training.settings import DEMO_NOISE, DEMO_SETTINGS, DEMO_STEPS_PER_MINUTE
from emdiffuse.training.state import latest_checkpoint, load_state
from emdiffuse.training.synthetic import synthetic_block
from emdiffuse.training.trainer import train


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


def evaluate_denoiser(
    checkpoint: str | os.PathLike,
    noisy: np.ndarray,
    clean: np.ndarray,
    *,
    sampler: str = "ddim",
    steps: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """PSNR/SSIM of the noisy input and of the enhanced output against ``clean`` (raw units,
    data range of ``clean``), slice by slice with whole-slice tiles."""
    enhancer = Enhancer.load(checkpoint, device=device, expect_task="denoise")
    m = enhancer.multiple
    z, h, w = noisy.shape
    h, w = h - h % m, w - w % m
    noisy, clean = noisy[:, :h, :w], clean[:, :h, :w]
    cond = normalize(noisy, enhancer.config)[:, None]
    noise = np.random.default_rng(seed).standard_normal(cond.shape).astype(np.float32)
    out = np.concatenate(
        [
            enhancer.enhance(cond[i : i + 2], noise[i : i + 2], sampler=sampler, steps=steps)
            for i in range(0, z, 2)
        ]
    )[:, 0]
    enhanced = denormalize(out, enhancer.config)
    rng_ = float(clean.max() - clean.min())
    return {
        "psnr_noisy": metrics.psnr(noisy, clean, data_range=rng_),
        "psnr_enhanced": metrics.psnr(enhanced, clean, data_range=rng_),
        "ssim_noisy": metrics.ssim(noisy, clean, data_range=rng_),
        "ssim_enhanced": metrics.ssim(enhanced, clean, data_range=rng_),
    }


def train_demo_denoiser(
    out: str | os.PathLike,
    *,
    minutes: float = 5.0,
    seed: int = 0,
    shape: tuple[int, int, int] = (8, 256, 256),
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


__all__ = ["demo_pair", "evaluate_denoiser", "train_demo_denoiser", "DEMO_SETTINGS", "DEMO_NOISE"]
