"""Validation during training: few-step samples of a fixed held-out batch, scored, and the
calibration of the sample spread at the end.

:func:`validate` samples the validation batch with the EMA weights through the same
:class:`~emdiffuse.models.enhancer.Enhancer` inference uses and scores PSNR/SSIM against the
targets, those of the one-evaluation posterior mean (``val_psnr_mean``) and those of
:func:`baseline` (what the input alone gives); :func:`save_validation_png` writes a
condition | output | target grid. :func:`calibrate` fits the conformal scale of N samples'
spread on held-out patches (:mod:`emdiffuse.models.calibration`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from emdiffuse import metrics
from emdiffuse.models import calibration, step_fit
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.sampler_names import DEFAULT_SAMPLER, STOCHASTIC, default_sampling
from emdiffuse.training.settings import TrainSettings

if TYPE_CHECKING:  # the loader imports torch's data tools; only the annotation needs it
    from emdiffuse.training.loader import PatchDataset


def baseline(
    cond: np.ndarray, task: str, k: int, out_channels: int, z_context: int = 0
) -> np.ndarray:
    """What the input alone gives on the target grid: the noisy image, bicubic upsampling,
    or linear interpolation between the two bounding slices (channels ``z_context`` and
    ``z_context + 1`` of an isotropic condition; a denoise condition's own slice is channel
    ``z_context``)."""
    if task == "denoise":
        return cond[:, z_context : z_context + 1]
    if task == "super-resolve":
        return upsample_xy(torch.from_numpy(cond), k).numpy()
    c = z_context
    w = (np.arange(1, out_channels + 1, dtype=np.float32) / k)[None, :, None, None]
    return (1 - w) * cond[:, c : c + 1] + w * cond[:, c + 1 : c + 2]


def validate(
    ema_net: torch.nn.Module,
    config,
    batch: dict[str, torch.Tensor],
    s: TrainSettings,
    device: torch.device,
) -> tuple[dict[str, float], np.ndarray]:
    """Few-step sampling of the fixed validation batch with the EMA weights."""
    enhancer = _enhancer_of(ema_net, config, s, device)
    cond = batch["cond"].numpy()
    target = batch["target"].numpy()
    noise = np.random.default_rng([s.seed, 0xA11]).standard_normal(target.shape)
    noise = noise.astype(np.float32)
    output = enhancer.enhance(cond, noise, sampler=s.sampler, steps=s.val_steps)
    mean = np.clip(enhancer.posterior_mean(cond, noise), -1.0, 1.0)
    base = baseline(cond, config.task, config.k, target.shape[1], config.z_context)
    values = {
        "val_psnr": metrics.psnr(output, target, data_range=2.0),
        "val_ssim": metrics.ssim(output, target, data_range=2.0),
        "val_psnr_mean": metrics.psnr(mean, target, data_range=2.0),
        "val_ssim_mean": metrics.ssim(mean, target, data_range=2.0),
        "val_psnr_input": metrics.psnr(base, target, data_range=2.0),
        "val_ssim_input": metrics.ssim(base, target, data_range=2.0),
    }
    return values, output


def calibrate(
    ema_net: torch.nn.Module,
    config,
    batch: dict[str, torch.Tensor],
    s: TrainSettings,
    device: torch.device,
) -> dict:
    """The calibration record of the EMA model on held-out ``batch``: ``s.calibration_samples``
    samples (the run's default sampling for this model, as ``emdiffuse enhance`` draws them:
    its fitted schedule where ``config`` has one; seeded),
    their spread against the error of their mean (:func:`emdiffuse.models.calibration.fit`,
    model space), plus the sampler, steps, spacing and patches used and, for a model with a mean
    network, how much its samples' residual parts correlate
    (:func:`emdiffuse.models.calibration.residual_correlation`)."""
    enhancer = _enhancer_of(ema_net, config, s, device)
    cond = batch["cond"].numpy()
    target = batch["target"].numpy().astype(np.float64)
    rng = np.random.default_rng([s.seed, 0xCA1])
    steps, spacing = default_sampling(DEFAULT_SAMPLER, None, None,
                                      config.step_schedules if config.residual else None)  # fmt: skip
    draws, residuals = [], []
    mean = None
    for _ in range(s.calibration_samples):
        noise = rng.standard_normal(target.shape).astype(np.float32)
        step_noise = None
        if DEFAULT_SAMPLER in STOCHASTIC:
            steps_noise = rng.standard_normal((steps, *target.shape)).astype(np.float32)
            step_noise = steps_noise.__getitem__
        if config.residual and mean is None:
            mean = enhancer.posterior_mean(cond)
        m, r = enhancer.sample_parts(cond, noise, sampler=DEFAULT_SAMPLER, steps=steps,
                                     spacing=spacing, step_noise=step_noise, mean=mean)  # fmt: skip
        draws.append(np.clip(m + r, -1.0, 1.0))
        residuals.append(r)
    record = calibration.fit(np.stack(draws), target, level=s.calibration_level)
    record.update(sampler=DEFAULT_SAMPLER, steps=steps, spacing=spacing, patches=int(len(target)))
    if config.residual:
        record["residual_correlation"] = calibration.residual_correlation(np.stack(residuals))
    if enhancer.has_error_head:
        mean, sigma = enhancer.posterior_mean_and_sigma(cond)
        record["mean_interval"] = calibration.fit_mean(mean, sigma, target,
                                                       level=s.calibration_level)  # fmt: skip
    return record


def fit_step_schedule(
    ema_net: torch.nn.Module,
    config,
    batch: dict[str, torch.Tensor],
    s: TrainSettings,
    device: torch.device,
) -> dict:
    """The ``ModelConfig.step_schedules`` record of the EMA model (residual kind): an
    ``s.fit_steps``-step schedule fitted on held-out ``batch`` from seeded starting noise
    (:meth:`~emdiffuse.models.enhancer.Enhancer.fit_step_schedule`)."""
    enhancer = _enhancer_of(ema_net, config, s, device)
    cond = batch["cond"].numpy()
    rng = np.random.default_rng([s.seed, 0x57E9])
    noise = rng.standard_normal(tuple(batch["target"].shape)).astype(np.float32)
    fitted = enhancer.fit_step_schedule(cond, noise, s.fit_steps)
    return {"sampler": step_fit.FIT_SAMPLER, "reference_steps": step_fit.REFERENCE_STEPS,
            "patches": int(len(cond)), "schedules": {str(s.fit_steps): fitted}}  # fmt: skip


def _enhancer_of(ema_net: torch.nn.Module, config, s: TrainSettings, device) -> Enhancer:
    """An Enhancer of a copy of the EMA network (the Enhancer freezes its network's
    parameters; the training's copy goes on)."""
    net = copy.deepcopy(ema_net)
    return Enhancer(config, net, device=device, precision=s.precision, channels_last=False)


def calibration_axes(dataset: PatchDataset) -> tuple[str | None, ...]:
    """The axes a model's calibration patches are read along: ``("y", "x")`` for an
    anisotropic dataset that trains on both lateral axes (each fitted on its own, see
    :func:`hardest_axis`), else ``(None,)``: the dataset's own patches."""
    if dataset.recipe == "anisotropic" and dataset.axis == "both":
        return ("y", "x")
    return (None,)


def hardest_axis(records: dict[str | None, dict]) -> dict:
    """One calibration record from records fitted along each lateral axis of an anisotropic
    model: the one with the largest scale (its intervals widest for a given spread), with
    ``axis`` and every axis' ``scale_by_axis`` added. The model is applied along z, which no
    training patch shows; the intervals then hold along z as long as z is no harder, for the
    model's spread, than the harder lateral axis (on FlyEM z is a little harder still: the
    intervals cover 86–88 % there). The error head's ``mean_interval`` records, when there,
    are chosen the same way on their own. The ``scales`` at the other levels are each the
    largest over the axes. A single record (``None`` axis) is returned as it is."""
    if list(records) == [None]:
        return records[None]
    axis = max(records, key=lambda a: records[a]["scale"])
    record = {**records[axis], "axis": axis, "scales": _widest_scales(records.values()),
              "scale_by_axis": {a: float(r["scale"]) for a, r in records.items()}}  # fmt: skip
    means = {a: r["mean_interval"] for a, r in records.items() if "mean_interval" in r}
    if means:  # the error head's intervals: their own hardest axis
        mean_axis = max(means, key=lambda a: means[a]["scale"])
        record["mean_interval"] = {**means[mean_axis], "axis": mean_axis,
                                   "scales": _widest_scales(means.values())}  # fmt: skip
    return record


def _widest_scales(records) -> list[list[float]]:
    """Each stored level's largest scale over ``records`` (the levels all of them hold)."""
    tables = [{float(lv): float(s) for lv, s in r.get("scales") or ()} for r in records]
    common = set.intersection(*(set(t) for t in tables))
    return [[lv, max(t[lv] for t in tables)] for lv in sorted(common)]


def condition_on_output_grid(cond: torch.Tensor, config) -> np.ndarray:
    """The condition as the network sees it (upsampled for super-resolution; for isotropic
    models the bounding pair, for denoising the noisy slice, without their z context), for
    pictures."""
    if config.z_context:
        c = config.z_context
        cond = cond[:, c : c + (2 if config.isotropic else 1)]
    if config.xy_scale == 1:
        return cond.numpy()
    return upsample_xy(cond, config.xy_scale, config.cond_upsample).numpy()


def save_validation_png(
    path: Path, cond: np.ndarray, output: np.ndarray, target: np.ndarray, rows: int = 4
) -> None:
    """A grid: one row per sample, columns condition | output | target (first channel)."""
    # lazy: matplotlib takes a second to import and only validation pictures need it
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(rows, len(target))
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.3), squeeze=False)
    for i in range(n):
        for j, (img, title) in enumerate(
            ((cond[i, 0], "condition"), (output[i, 0], "output"), (target[i, 0], "target"))
        ):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


__all__ = [
    "baseline", "validate", "calibrate", "calibration_axes", "hardest_axis",
    "condition_on_output_grid", "save_validation_png",
]  # fmt: skip
