"""Pictures of a registration: fixed in magenta, moving in green, before | after."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emdiffuse.training.registration.report import RegistrationReport


def _unit(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, (1, 99))
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1)


def overlay_rgb(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """RGB (y, x, 3): fixed in magenta, moving in green (aligned structures turn grey/white)."""
    f, m = _unit(fixed), _unit(moving)
    return np.stack([f, m, f], axis=-1)


def save_overlay(
    path: str | Path,
    fixed: np.ndarray,
    moving: np.ndarray,
    aligned: np.ndarray,
    *,
    title: str = "",
    report: RegistrationReport | None = None,
) -> str:
    """PNG with two panels, before | after: fixed magenta, moving green."""
    # lazy: matplotlib takes a second to import and only --report needs it
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), constrained_layout=True)
    labels = ["before", "after"]
    if report is not None:
        mean = report.mean()
        after = mean["ncc_rigid"] if report.method == "rigid" else mean["ncc_flow"]
        labels = [
            f"before (NCC {mean['ncc_before']:.3f})",
            f"after {report.method} (NCC {after:.3f})",
        ]
    for ax, image, label in zip(axes, (moving, aligned), labels, strict=True):
        ax.imshow(overlay_rgb(fixed, image), interpolation="nearest")
        ax.set_title(label)
        ax.set_axis_off()
    fig.suptitle(title or "fixed = magenta, moving = green")
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return str(path)


__all__ = ["overlay_rgb", "save_overlay"]
