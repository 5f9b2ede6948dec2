"""The project's own path: models trained with ``emdiffuse.training.trainer.train`` and test
volumes enhanced with ``emdiffuse.enhance`` on OME-Zarr (default sampler and steps).

Trained models are cached outside the repository, keyed on every setting that decides them,
together with their training wall time, so re-running the evaluation is cheap.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality_data import VOXEL_NM, Level, Sizes, TaskData, settings_key

import emdiffuse
from emdiffuse import io
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.training import trainer
from emdiffuse.training.settings import DEMO_SETTINGS

KINDS = ("diffusion", "regression", "diffusion-a")  # -a: vemdiffuse-a (anisotropic recipe)


def enhance_defaults() -> dict[str, Any]:
    """The current defaults of ``emdiffuse.enhance`` (sampler, steps): what users get."""
    params = inspect.signature(enhance).parameters
    return {"sampler": params["sampler"].default, "steps": params["steps"].default}


def train_settings(sizes: Sizes) -> dict[str, Any]:
    """Trainer settings of every project model: the demo's tiny-CPU recipe, ``sizes.steps``
    steps, one validation and one checkpoint at the end."""
    settings = {**DEMO_SETTINGS}
    settings.update(patch=sizes.patch, region=sizes.region, val_every=sizes.steps,
                    ckpt_every=sizes.steps)  # fmt: skip
    return settings


def _sources(kind: str, data: TaskData) -> tuple[str, list[np.ndarray], list[float]]:
    level, v = data.level, VOXEL_NM
    if level.task == "denoise":
        return "denoise", [data.train["noisy"], data.train["clean"]], [v, v, v]
    if level.task == "super-resolve":
        return "super-resolve", [data.train["clean"]], [v, v, v]
    if kind == "diffusion-a":
        return "anisotropic", [data.train["aniso"]], [v * level.factor, v, v]
    return "isotropic", [data.train["clean"]], [v, v, v]


def train_model(
    kind: str, data: TaskData, sizes: Sizes, cache: Path, *, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Train (or reuse from ``cache``) the project model ``kind`` of ``data.level``.

    Returns ``{"path", "seconds", "steps", "cached", "task", "settings"}``; ``seconds`` is
    the wall time of the training that made the model (also when reused).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    level = data.level
    task, sources, voxel = _sources(kind, data)
    settings = train_settings(sizes)
    options = dict(settings, objective="regression" if kind == "regression" else "diffusion")
    if level.task != "denoise":
        options["factor"] = level.factor
    key = settings_key(level, sizes.train_shape, sizes.aniso_train_slices, sizes.steps, kind,
                       options, seed, emdiffuse.__version__)  # fmt: skip
    folder = cache / "models" / f"{level.key}-{kind}-{key}"
    meta_path = folder / "meta.json"
    if meta_path.exists() and (folder / trainer.FINAL_NAME).exists():
        meta = json.loads(meta_path.read_text())
        return {**meta, "path": str(folder / trainer.FINAL_NAME), "cached": True}
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    path = trainer.train(task, sources, folder, steps=sizes.steps, seed=seed, progress=progress,
                         voxel_size=voxel, device="cpu", **options)  # fmt: skip
    seconds = time.perf_counter() - start
    meta = {"task": task, "steps": sizes.steps, "seconds": seconds, "settings": options,
            "seed": seed, "params": _count_params(path)}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=1))
    return {**meta, "path": str(path), "cached": False}


def _count_params(path: str | Path) -> int:
    from emdiffuse.models.checkpoints import load_checkpoint

    _, state = load_checkpoint(path)
    return int(sum(t.numel() for t in state.values()))


def write_input(array: np.ndarray, path: Path, voxel: tuple[float, float, float]) -> Path:
    """A test input as OME-Zarr (replaced if present)."""
    if path.exists():
        shutil.rmtree(path)
    io.write_image(np.asarray(array, dtype=np.float32), path, voxel_size=voxel)
    return path


def run_enhance(
    model: str | Path,
    source: Path,
    out: Path,
    *,
    samples: int,
    seed: int,
    steps: int | None = None,
    sampler: str | None = None,
) -> dict[str, Any]:
    """``emdiffuse.enhance`` of ``source`` into ``out`` on the in-process threaded scheduler.

    Returns ``{"mean", "std" (None for one sample), "seconds", "steps", "sampler"}``.
    """
    defaults = enhance_defaults()
    steps = defaults["steps"] if steps is None else steps
    sampler = defaults["sampler"] if sampler is None else sampler
    start = time.perf_counter()
    result = enhance(source, model, out, steps=steps, samples=samples, seed=seed, sampler=sampler,
                     dtype="float32", overwrite=True, scheduler="threads", workers=1,
                     progress=False)  # fmt: skip
    mean = np.asarray(result.values, dtype=np.float32)
    std = None
    if samples > 1:
        std = np.asarray(io.open_volume(str(out / "uncertainty")).data.compute(), np.float32)
    return {"mean": mean, "std": std, "seconds": time.perf_counter() - start, "steps": steps,
            "sampler": sampler, "samples": samples, "seed": seed}  # fmt: skip


def level_work_dir(cache: Path, level: Level) -> Path:
    """Scratch folder of a level's OME-Zarr inputs and outputs (outside the repository)."""
    path = cache / "work" / level.key
    path.mkdir(parents=True, exist_ok=True)
    return path
