"""Figures of the quality benchmark: crop panels, metric bars, calibration, real EM."""

from __future__ import annotations

import io
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


def panel(entry: dict[str, Any], path: Path, *, title: str, wrap: int = 8) -> Path:
    """One level: truth | input | every method | uncertainty, the same crop, ``wrap``
    images a row.

    ``entry``: ``label``, ``view`` ("xy" or "xz"), ``z`` (slice shown), ``columns``
    [(title, volume)], ``uncertainty`` (volume or None) and ``uncertainty_title``.
    """
    plt = _plt()
    items = [(t, v, "gray") for t, v in entry["columns"]]
    if entry.get("uncertainty") is not None:
        items.append((entry.get("uncertainty_title", "uncertainty"), entry["uncertainty"], "magma"))
    n_cols = min(wrap, len(items))
    n_rows = -(-len(items) // n_cols)
    first = crop(entry["columns"][0][1], entry["view"], entry["z"])
    aspect = first.shape[0] / first.shape[1]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, (1.9 * aspect + 0.55) * n_rows),
                             squeeze=False)  # fmt: skip
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(items):
            ax.axis("off")
            continue
        name, volume, cmap = items[i]
        image = crop(volume, entry["view"], entry["z"])
        kw = {"vmin": 0.0, "vmax": 1.0} if cmap == "gray" else {}
        ax.imshow(image, cmap=cmap, interpolation="nearest", **kw)
        ax.set_title(textwrap.fill(name, 24), fontsize=6)
    view = (
        "xz section (z down)"
        if entry["view"] == "xz"
        else f"xy crop {CROP}×{CROP}, slice {entry['z']}"
    )
    fig.suptitle(f"{entry['task']} {entry['label']}: {title}, {view}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frc_curves(task: str, levels: list[tuple[str, list[dict]]], path: Path, *, title: str,
               voxel_nm: float) -> Path:  # fmt: skip
    """FRC against the truth per method (one panel per level), frequency in 1/nm; the
    1/7 threshold dashed. Inputs dotted, classical dashed, learned peers and emdiffuse solid."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(levels), figsize=(6.2 * len(levels), 4.6), squeeze=False)
    style = {"input": ":", "classical": "--", "learned": "-", "emdiffuse": "-"}
    for ax, (label, rows) in zip(axes[0], levels, strict=True):
        for r in rows:
            c = r.get("frc_curve")
            if not c:
                continue
            lw = 1.6 if r["group"] == "emdiffuse" else 1.0
            ax.plot(np.asarray(c["freq"]) / voxel_nm, c["frc"], style.get(r["group"], "-"),
                    lw=lw, label=r["label"])  # fmt: skip
        ax.axhline(1 / 7, color="k", lw=0.7, ls="--")
        ax.set_xlabel("spatial frequency (1/nm)")
        ax.set_ylabel("FRC against the truth")
        ax.set_ylim(-0.1, 1.02)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, loc="upper right", ncol=1)
    fig.suptitle(f"{task}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metric_bars(task: str, levels: list[tuple[str, list[dict]]], path: Path, *, title: str) -> Path:
    """PSNR, SSIM, FRC resolution (nm, against the truth), spectrum error and bias per
    method (row label: method, output, budget), one bar per level."""
    plt = _plt()
    methods: list[str] = []
    for _, rows in levels:
        methods += [r["label"] for r in rows if r["label"] not in methods]
    keys = (
        ("psnr", "PSNR (dB) ↑"),
        ("ssim", "SSIM ↑"),
        ("frc_truth_nm", "FRC 1/7 vs truth (nm) ↓"),
        ("spectrum_error", "spectrum error, upper half ↓"),
        ("bias_pct", "bias, % of truth range (0 best)"),
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(21, 0.24 * len(methods) + 1.8))
    width = 0.8 / max(len(levels), 1)
    for ax, (key, name) in zip(axes, keys, strict=True):
        for i, (label, rows) in enumerate(levels):
            by = {r["label"]: r.get(key, np.nan) for r in rows}
            values = [by.get(m, np.nan) for m in methods]
            values = [np.nan if v is None or not np.isfinite(v) else v for v in values]
            ax.barh(np.arange(len(methods)) + i * width, values, height=width, label=label)
        ax.set_yticks(np.arange(len(methods)) + width * (len(levels) - 1) / 2)
        ax.set_yticklabels(methods if ax is axes[0] else [], fontsize=6)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{task}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def calibration_plot(curves: list[dict[str, Any]], path: Path) -> Path:
    """Reliability: the binned uncertainty map against the actual RMSE of the mean, one
    panel per task; a calibrated std lies on the diagonal (a 90 % half-width at 1.645 x it)."""
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
        ax.set_xlabel("written uncertainty (σ or half-width; binned, equal counts)")
        ax.set_ylabel("actual RMSE of the mean of N")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def real_em_figure(
    inputs: np.ndarray,
    outputs: np.ndarray,
    stds: np.ndarray,
    names: list[str],
    path: Path,
    uncertainty_label: str = "uncertainty (std)",
) -> Path:
    """Rows = real EM patches; columns input | output (mean of samples) | uncertainty (what
    the map holds: ``uncertainty_label``). Saved with a 256-colour palette: noisy EM does not
    compress, and full RGBA made it 1.9 MB for 4 patches (0.7 MB so)."""
    plt = _plt()
    n = len(inputs)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 0.4), squeeze=False)
    lo, hi = np.percentile(inputs, (0.5, 99.5))
    olo, ohi = np.percentile(outputs, (0.5, 99.5))
    for i in range(n):
        for j, (image, title, kw) in enumerate((
            (inputs[i], f"input {names[i]}", {"cmap": "gray", "vmin": lo, "vmax": hi}),
            (outputs[i], "output (mean of samples)", {"cmap": "gray", "vmin": olo, "vmax": ohi}),
            (stds[i], uncertainty_label, {"cmap": "magma"}),
        )):  # fmt: skip
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest", **kw)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("real EM (no ground truth), denoiser trained on synthetic data only", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency

    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)
    return path
