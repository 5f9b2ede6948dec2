"""The demo: synthetic EM, a tiny denoiser trained (or reused from the cache), enhancement
through a LocalCluster, metrics against the ground truth, a picture, and how to view it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from emdiffuse import __version__, io, metrics
from emdiffuse.errors import InputError
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.training.demo_model import DEMO_TRAIN_SHAPE, demo_pair, train_demo_denoiser
from emdiffuse.training.settings import DEMO_NOISE, DEMO_SETTINGS
from emdiffuse.training.settings import defaults as train_defaults

SIZES = {"small": (8, 256, 256), "medium": (32, 512, 512)}
# what a cached demo model holds besides its settings: 2, its calibration records how much its
# samples' residuals correlate (the blend of overlapping tiles uses it); earlier ones retrain.
# Every trainer default is in the key as well (a new default, e.g. the mean network's
# least-squares start, retrains the cached model), and so is the preset's architecture (e.g.
# the mean network's channel norm).
MODEL_REVISION = 2
HELD_OUT_ORIGIN = (10_000, 5_000, 5_000)  # far from the training region (origin 0)


def cache_dir() -> Path:
    """Where demo models are kept between runs ($EMDIFFUSE_CACHE or ~/.cache/emdiffuse)."""
    return Path(os.environ.get("EMDIFFUSE_CACHE") or Path.home() / ".cache" / "emdiffuse")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """A fresh demo folder: new, empty, or (with ``overwrite``) an earlier demo's, replaced.
    Anything else is refused (``io.refuse_output``)."""
    io.refuse_output(out, overwrite=overwrite, kind="demo", name="--out")
    io.make_output_folder(out, "demo", replace=True)


def demo_architecture() -> str:
    """The demo preset's model config as JSON: what a cached demo model must have been built as."""
    kind = "residual" if DEMO_SETTINGS.get("objective") == "residual" else "sr3"
    return make_config("emdiffuse-n", DEMO_SETTINGS["size"], kind=kind).to_json()


def demo_model(minutes: float, *, cache: Path, seed: int = 0, progress: bool = True) -> tuple[Path, bool]:
    """The demo denoiser: reused from ``cache`` when an earlier run trained it, else trained."""
    key = json.dumps([__version__, minutes, seed, DEMO_SETTINGS, DEMO_NOISE, DEMO_TRAIN_SHAPE, MODEL_REVISION,
                      train_defaults(), demo_architecture()], sort_keys=True, default=str)  # fmt: skip
    folder = cache / f"demo-denoise-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    model = folder / "model.safetensors"
    if model.exists():
        return model, True
    path, _ = train_demo_denoiser(folder, minutes=minutes, seed=seed, evaluate=False, progress=progress, overwrite=True)
    return Path(path), False


def run_demo(
    out: str | os.PathLike = "emdiffuse-demo",
    *,
    size: str = "small",
    shape: tuple[int, int, int] | None = None,
    minutes: float = 5.0,
    steps: int | None = None,
    samples: int = 2,
    workers: int = 2,
    cache: str | os.PathLike | None = None,
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the denoising demo end to end; returns the metrics and the paths written.
    ``steps`` None: the model's default sampling (the 4-step schedule it fitted).
    ``samples``: 0 enhances with the posterior mean only (one network evaluation per tile,
    the fastest), 1 with one sample, N >= 2 with the mean of N samples and writes the
    uncertainty image (shown in the picture)."""
    if size not in SIZES and shape is None:
        raise InputError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out)
    _prepare_out(out, overwrite)
    shape = tuple(shape or SIZES[size])
    noisy, clean = demo_pair(shape, origin=HELD_OUT_ORIGIN, seed=0, noise_seed=101)
    voxel = (8.0, 8.0, 8.0)
    io.write_image(clean, out / "clean.ome.zarr", voxel_size=voxel)
    io.write_image(noisy, out / "noisy.ome.zarr", voxel_size=voxel)
    print(f"synthetic held-out volume {shape} (zyx, 8 nm voxels) written to {out}")

    model, reused = demo_model(minutes, cache=Path(cache) if cache else cache_dir(), progress=progress)
    print(("reusing model " if reused else "trained model ") + str(model))

    result = enhance(
        out / "noisy.ome.zarr", model, out / "enhanced.ome.zarr",
        steps=steps, samples=samples, seed=0, dtype="float32",
        workers=workers, scheduler=scheduler, progress=progress,
    )
    enhanced = np.asarray(result.values, dtype=np.float32)
    data_range = float(clean.max() - clean.min())
    report = {
        "psnr_noisy": metrics.psnr(noisy, clean, data_range=data_range),
        "psnr_enhanced": metrics.psnr(enhanced, clean, data_range=data_range),
        "ssim_noisy": metrics.ssim(noisy, clean, data_range=data_range),
        "ssim_enhanced": metrics.ssim(enhanced, clean, data_range=data_range),
        "model": str(model),
        "model_reused": reused,
        "output": str(out / "enhanced.ome.zarr"),
    }
    report["gain_db"] = report["psnr_enhanced"] - report["psnr_noisy"]
    print(f"\n{'':10}{'PSNR (dB)':>11}{'SSIM':>8}")
    print(f"{'noisy':10}{report['psnr_noisy']:>11.2f}{report['ssim_noisy']:>8.3f}")
    print(f"{'enhanced':10}{report['psnr_enhanced']:>11.2f}{report['ssim_enhanced']:>8.3f}")
    print(f"gain: {report['gain_db']:+.2f} dB")
    uncertainty, label = None, "uncertainty (std)"
    if samples >= 2:
        path = out / "enhanced.ome.zarr" / "uncertainty"
        uncertainty = io.open_volume(path).data.compute()
        label = _uncertainty_label(path)
        report["uncertainty"] = label
    report["figure"] = str(
        save_figure(out / "demo.png", clean, noisy, enhanced, uncertainty, label=label)
    )
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"picture: {report['figure']}")
    print(f"view: emdiffuse view {out}/enhanced.ome.zarr {out}/noisy.ome.zarr {out}/clean.ome.zarr")
    return report


def _uncertainty_label(path: Path) -> str:
    """The uncertainty panel's title from what the image holds (its ``emdiffuse``
    attributes): calibrated interval half-widths, or the standard deviation."""
    import zarr

    info = zarr.open_group(str(path), mode="r").attrs.get("emdiffuse", {})
    if info.get("uncertainty") == "half-width":
        return f"uncertainty ({float(info['level']):.0%} half-width)"
    return "uncertainty (std)"


def save_figure(
    path: Path, clean, noisy, enhanced, uncertainty=None, *, label: str = "uncertainty (std)"
) -> Path:
    """clean | noisy | enhanced | uncertainty (titled ``label``) of the middle slice, side
    by side."""
    # imported here: selecting the Agg backend on import would change the caller's (a
    # notebook importing this module), and matplotlib takes ~1 s to load
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = clean.shape[0] // 2
    panels = [(clean[z], "clean (truth)"), (noisy[z], "noisy input"), (enhanced[z], "enhanced")]
    if uncertainty is not None:
        panels.append((uncertainty[z], label))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.5))
    for ax, (image, title) in zip(axes, panels, strict=True):
        vmin, vmax = (None, None) if title.startswith("uncert") else (0.0, 1.0)
        ax.imshow(image, cmap="magma" if vmin is None else "gray", vmin=vmin, vmax=vmax)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
