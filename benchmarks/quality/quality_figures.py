"""Figures of the quality benchmark: crop panels, metric bars, calibration, real EM."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

CROP = 96


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def crop(volume: np.ndarray, view: str, z: int) -> np.ndarray:
    """A centred crop: an xy crop of slice ``z``, or an xz section (all z) through the
    middle row for ``view == "xz"``."""
    _, h, w = volume.shape
    c = min(CROP, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    if view == "xz":
        return volume[:, h // 2, x0 : x0 + c]
    return volume[z, y0 : y0 + c, x0 : x0 + c]


def panel(task: str, per_level: list[dict[str, Any]], path: Path) -> Path:
    """Rows = levels; columns = truth | input | baselines | emdiffuse | uncertainty.

    Each entry of ``per_level``: ``label``, ``view`` ("xy" or "xz"), ``z`` (slice shown),
    ``columns`` [(title, volume)], ``uncertainty`` (volume or None).
    """
    plt = _plt()
    n_cols = max(len(e["columns"]) + (e["uncertainty"] is not None) for e in per_level)
    xz = per_level[0]["view"] == "xz"
    height = max(crop(e["columns"][0][1], e["view"], e["z"]).shape[0] for e in per_level)
    row_h = 1.75 * (height / CROP if xz else 1.0) + 0.5
    fig, axes = plt.subplots(len(per_level), n_cols, figsize=(1.75 * n_cols, row_h * len(per_level)),
                             squeeze=False)  # fmt: skip
    for r, entry in enumerate(per_level):
        items = [(t, v, "gray") for t, v in entry["columns"]]
        if entry["uncertainty"] is not None:
            items.append(("uncertainty (std)", entry["uncertainty"], "magma"))
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                continue
            title, volume, cmap = items[c]
            image = crop(volume, entry["view"], entry["z"])
            kw = {"vmin": 0.0, "vmax": 1.0} if cmap == "gray" else {}
            ax.imshow(image, cmap=cmap, interpolation="nearest", **kw)
            ax.set_title(title, fontsize=7)
            if c == 0:
                # wrapped: a long level label on one line runs into the next row's
                ax.set_ylabel(textwrap.fill(entry["label"], 26), fontsize=7)
    view = "xz sections (z down)" if xz else f"xy crops {CROP}×{CROP}"
    fig.suptitle(f"{task}: held-out synthetic EM, {view}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_bars(task: str, levels: list[tuple[str, list[dict]]], path: Path) -> Path:
    """PSNR, SSIM and FRC resolution (nm, against the truth) per method, one bar per level."""
    plt = _plt()
    methods: list[str] = []
    for _, rows in levels:
        methods += [r["method"] for r in rows if r["method"] not in methods]
    keys = (
        ("psnr", "PSNR (dB) ↑"),
        ("ssim", "SSIM ↑"),
        ("frc_truth_nm", "FRC 1/7 vs truth (nm) ↓"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.28 * len(methods) + 1.6))
    width = 0.8 / max(len(levels), 1)
    for ax, (key, title) in zip(axes, keys, strict=True):
        for i, (label, rows) in enumerate(levels):
            by = {r["method"]: r.get(key, np.nan) for r in rows}
            values = [by.get(m, np.nan) for m in methods]
            ax.barh(np.arange(len(methods)) + i * width, values, height=width, label=label)
        ax.set_yticks(np.arange(len(methods)) + width * (len(levels) - 1) / 2)
        ax.set_yticklabels(methods if ax is axes[0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{task}: held-out synthetic EM", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def calibration_plot(curves: list[dict[str, Any]], path: Path) -> Path:
    """Reliability: binned predicted std against the actual RMSE of the mean, one panel per
    task; a calibrated uncertainty lies on the diagonal."""
    plt = _plt()
    tasks = list(dict.fromkeys(c["task"] for c in curves))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lo, hi = np.inf, 0.0
        for c in (c for c in curves if c["task"] == task):
            std, rmse = np.asarray(c["std"]), np.asarray(c["rmse"])
            keep = std > 0
            ax.plot(std[keep], rmse[keep], marker="o", ms=3, label=c["label"])
            if keep.any():
                lo = min(lo, std[keep].min(), rmse[keep].min())
                hi = max(hi, std[keep].max(), rmse[keep].max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="calibrated")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted std (binned, equal counts)")
        ax.set_ylabel("actual RMSE of the mean of 4")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def real_em_figure(
    inputs: np.ndarray, outputs: np.ndarray, stds: np.ndarray, names: list[str], path: Path
) -> Path:
    """Rows = real EM patches; columns input | output (mean of samples) | uncertainty."""
    plt = _plt()
    n = len(inputs)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 0.4), squeeze=False)
    lo, hi = np.percentile(inputs, (0.5, 99.5))
    olo, ohi = np.percentile(outputs, (0.5, 99.5))
    for i in range(n):
        for j, (image, title, kw) in enumerate((
            (inputs[i], f"input {names[i]}", {"cmap": "gray", "vmin": lo, "vmax": hi}),
            (outputs[i], "output (mean of samples)", {"cmap": "gray", "vmin": olo, "vmax": ohi}),
            (stds[i], "uncertainty (std)", {"cmap": "magma"}),
        )):  # fmt: skip
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest", **kw)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("real EM (no ground truth), denoiser trained on synthetic data only", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
