"""The project's own path: models trained with ``emdiffuse.training.trainer.train`` for a
wall-clock budget, test volumes enhanced with ``emdiffuse.enhance`` on OME-Zarr.

Budgets: a short probe run measures the trainer's rate (steps/s) for the model kind and
task; the real run gets ``steps = rate x budget x margin`` and ``time_limit = budget``, so
the time limit ends it. Where the trainer's cosine follows the clock (``lr_follows_time``,
the default since the thirtieth session) the margin is CLOCK_HORIZON_MARGIN: the steps only
cap the run, and the schedule reaches its floor at the limit whatever the probe measured.
Otherwise it is HORIZON_MARGIN, the schedule's horizon, and the run stops wherever its
cosine then is (0.78-0.95 of the way when the probe overestimated the rate). The steps
and seconds actually trained are read back from the run and recorded. Trained models are cached outside the repository, keyed on every setting that
decides them, with their training record, so re-running the evaluation is cheap.

Library features that are landing while this benchmark is written are detected, not
assumed (:func:`features`): the ``residual`` objective, ``enhance(samples=0)`` (the
posterior mean, one network evaluation) and a calibrated ``uncertainty/`` image.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import shutil
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from quality_data import Level, Sizes, TaskData, settings_key
from quality_plan import OBJECTIVE, Entry

import emdiffuse
from emdiffuse import io
from emdiffuse.models.presets import DEFAULT_ERROR_CHANNELS
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.run_record import read_run_config
from emdiffuse.training import trainer
from emdiffuse.training.settings import (
    OBJECTIVES,
    defaults,
    demo_recipe,
    field_names,
)  # fmt: skip

# the residual kind's settings, written out in its options so that a change of their
# defaults (e.g. mean_init) retrains its models instead of reusing cached ones
RESIDUAL_SETTINGS = ("mean_init", "mean_loss", "mean_ssim", "residual_scale", "mean_net")

HORIZON_MARGIN = 1.1  # a schedule by steps: steps = measured rate x budget x this
CLOCK_HORIZON_MARGIN = 1.5  # a cosine that follows the clock: the limit ends it, steps cap it
_RATES: dict[str, dict[str, Any]] = {}  # measured rates of this run
VARIANT = {"denoise": "emdiffuse-n", "super-resolve": "emdiffuse-r", "isotropic": "vemdiffuse-i"}


@cache
def features() -> dict[str, Any]:
    """What the installed library offers of the pieces issue 14 adds."""
    from emdiffuse.pipeline.settings import RunSettings

    try:
        RunSettings(samples=0)
        mean_mode = True
    except Exception:  # noqa: BLE001 - refused today: InputError("samples must be ...")
        mean_mode = False
    return {"residual": "residual" in OBJECTIVES, "mean_mode": mean_mode,
            "objectives": list(OBJECTIVES)}  # fmt: skip


def enhance_defaults() -> dict[str, Any]:
    """The current defaults of ``emdiffuse.enhance`` (sampler, steps): what users get."""
    params = inspect.signature(enhance).parameters
    return {"sampler": params["sampler"].default, "steps": params["steps"].default}


# Isotropic levels train at a quarter of the demo's learning rate: at 2e-3 the mean network's
# body blew up in the first ~150 steps and died (its output ~0, the model its linear skip,
# ~0.7 dB lower) in 2 of 8 FlyEM isotropic ×4 runs; at 5e-4 it did not, and scored as well or
# better at 2.5 min (READING.md, thirteenth session; benchmarks/quality/mean_activity.py).
# The mean network's channel norm now prevents the death itself; 5e-4 stays because it still
# scores higher (isotropic ×4: 29.40 against 29.29 dB at 2e-3, seventeenth session).
ISOTROPIC_LR = 5e-4

# Isotropic levels also read one input slice beyond each bounding slice (`train --z-context
# 1`): on FlyEM after 2.5 min +0.09 and +0.13 dB at isotropic ×4 (seeds 0 and 1), +0.01 dB at
# ×8; after 20 min at ×4 29.71 against 29.63 dB (READING.md, twenty-third session).
# `train`'s own default stays the reference's pair of slices, as DESIGN.md describes the task.
ISOTROPIC_Z_CONTEXT = 1


def train_settings(sizes: Sizes, extra: dict[str, Any] | None = None,
                   objective: str = "residual") -> dict[str, Any]:  # fmt: skip
    """Trainer settings of every project model: the demo's short-CPU recipe for the model's
    ``objective`` (``demo_recipe``) at the run's patch and region, plus ``extra`` (the
    ``--train-set`` options, those the installed TrainSettings knows; the residual kind's
    own only for the residual kind)."""
    known = set(field_names())
    extra = {k: v for k, v in (extra or {}).items() if k in known}
    return demo_recipe(objective, {"patch": sizes.patch, "region": sizes.region, **extra})


def model_name(entry: Entry, task: str) -> str:
    """The row name of a project model: variant and kind, and the slices a model reading z
    reads."""
    if entry.kind == "regression":
        return "regression UNet (L1)"
    variant = "vemdiffuse-a" if entry.aniso else VARIANT[task]
    return f"{variant}, {entry.kind}{entry.reads}"


def train_sources(entry: Entry, data: TaskData) -> tuple[str, list[np.ndarray], list[float]]:
    """What ``entry`` trains on for ``data``'s level: the trainer task, the source arrays and
    their voxel size (nm, zyx)."""
    level = data.level
    if level.task == "denoise":
        return (
            "denoise",
            [data.train["noisy"], data.train["clean"]],
            list(data.train_voxel["clean"]),
        )
    if level.task == "super-resolve":
        return "super-resolve", [data.train["clean"]], list(data.train_voxel["clean"])
    if entry.aniso:
        return "anisotropic", [data.train["aniso"]], list(data.train_voxel["aniso"])
    return "isotropic", [data.train["clean"]], list(data.train_voxel["clean"])


def train_options(entry: Entry, data: TaskData, sizes: Sizes, extra) -> dict[str, Any]:
    """Trainer options of ``entry`` on ``data``: the shared recipe, the kind's objective, the
    level's factor. vemdiffuse-a's patch runs along z of its z-subsampled training volume,
    so it is cut to fit (a multiple of 8); isotropic levels train at :data:`ISOTROPIC_LR`
    with :data:`ISOTROPIC_Z_CONTEXT` unless ``extra`` sets ``lr`` or ``z_context``; a method
    reading z (``residual-z1``) trains with its z context whatever ``extra`` says; the
    regression UNet skips the end-of-training calibration of the sample spread (it has
    none); the residual kind's own settings (:data:`RESIDUAL_SETTINGS`) are written out."""
    level = data.level
    options = train_settings(sizes, extra, OBJECTIVE[entry.kind])
    if entry.kind == "residual":  # the kind's own settings, recorded (and in the cache key)
        installed = defaults()
        options.update({name: installed[name] for name in RESIDUAL_SETTINGS
                        if name in installed and name not in options})  # fmt: skip
    if level.task != "denoise":
        options["factor"] = level.factor
    if level.task == "isotropic":  # the isotropic recipe, where --train-set leaves it
        recipe = {"lr": ISOTROPIC_LR, "z_context": ISOTROPIC_Z_CONTEXT}
        options.update({k: v for k, v in recipe.items() if k not in (extra or {})})
    if entry.z_context:
        options["z_context"] = entry.z_context
    if entry.aniso:
        options["patch"] = min(options["patch"], data.train["aniso"].shape[0] // 8 * 8)
    if entry.kind == "regression" and "calibration_samples" in field_names():
        options["calibration_samples"] = 0
    return options


def _run_record(folder: Path) -> dict[str, Any]:
    """Steps and loop seconds a finished training run reached (its last checkpoint)."""
    from emdiffuse.training.state import latest_checkpoint, load_state

    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        return {}
    state = load_state(ckpt)
    return {"steps": int(state["step"]), "loop_seconds": float(state.get("elapsed", math.nan))}


def _rate_from_scalars(folder: Path) -> float | None:
    """Steps per second between the first and last logged rows of ``scalars.csv``."""
    path = folder / "scalars.csv"
    if not path.exists():
        return None
    with path.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("elapsed_s")]
    if len(rows) < 2:
        return None
    (s0, t0), (s1, t1) = ((int(r["step"]), float(r["elapsed_s"])) for r in (rows[0], rows[-1]))
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def measure_rate(entry: Entry, data: TaskData, sizes: Sizes, cache_dir: Path, *, seconds: float,
                 seed: int, extra=None, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Training steps per second of ``entry``'s kind on ``data``'s task and ``device``: a
    probe run of ``seconds``, measured once per run (not across runs: the shared machine's
    load changes) for each task, kind, factor, settings and device."""
    task, sources, voxel = train_sources(entry, data)
    options = train_options(entry, data, sizes, extra)
    key = settings_key("rate", task, options, seconds, emdiffuse.__version__, *_on(device))
    if key in _RATES:
        return {**_RATES[key], "reused": True}
    folder = cache_dir / "rates" / f"probe-{key}"
    if folder.exists():
        shutil.rmtree(folder)
    big = 10**6  # horizon far away: the probe measures speed, not learning
    options.update(val_every=big, ckpt_every=big)
    if "calibration_samples" in field_names():
        options["calibration_samples"] = 0
    if "error_refit_steps" in field_names():  # the loop's rate alone, over all its seconds
        options["error_refit_steps"] = 0
    start = time.perf_counter()
    trainer.train(task, sources, folder, steps=big, seed=seed, progress=False, voxel_size=voxel,
                  device=device, time_limit=seconds, **options)  # fmt: skip
    wall = time.perf_counter() - start
    record = _run_record(folder)
    rate = _rate_from_scalars(folder) or record.get("steps", 1) / max(seconds, 1e-3)
    shutil.rmtree(folder, ignore_errors=True)
    _RATES[key] = {"steps_per_second": rate, "probe_seconds": seconds, "probe_wall": wall,
                   "probe_steps": record.get("steps")}  # fmt: skip
    return {**_RATES[key], "reused": False}


def planned_rate(entry: Entry, data: TaskData, sizes: Sizes, cache_dir: Path, *, seconds: float,
                 seed: int, extra=None, device: str = "cpu", warmup: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """The average training rate of a whole run (:func:`measure_rate`). With a mean-only
    warm-up (the residual kind's ``mean_warmup`` w of the steps) the two phases run at their
    own rates: a probe inside the warm-up alone measured the mean network's (about 4× the
    joint rate), planned a horizon the budget never reached and left the learning rate
    un-annealed, the residual network a fraction of its steps. So both are measured and the
    horizon H solves w·H / r_mean + (1 − w)·H / r_joint = the budget."""
    if warmup <= 0 or entry.kind != "residual":
        return measure_rate(entry, data, sizes, cache_dir, seconds=seconds, seed=seed,
                            extra=extra, device=device)  # fmt: skip
    phases = {name: measure_rate(entry, data, sizes, cache_dir, seconds=seconds, seed=seed,
                                 extra={**(extra or {}), "mean_warmup": w}, device=device)
              for name, w in (("joint", 0.0), ("mean_only", 0.5))}  # fmt: skip
    # the probe's horizon is 10**6 steps: at mean_warmup 0.5 it never leaves the warm-up
    per_step = (warmup / phases["mean_only"]["steps_per_second"]
                + (1 - warmup) / phases["joint"]["steps_per_second"])  # fmt: skip
    return {"steps_per_second": 1.0 / per_step, "mean_warmup": warmup, **phases}


@cache
def training_code_digest() -> str:
    """A hash of the library code a trained model depends on (``emdiffuse/models`` and
    ``emdiffuse/training``): part of a model's cache key, so a change to how models train
    retrains them instead of reusing models the old code made."""
    root = Path(emdiffuse.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(f for sub in ("models", "training") for f in (root / sub).rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]


def train_model(
    entry: Entry,
    data: TaskData,
    sizes: Sizes,
    cache_dir: Path,
    *,
    budget: float,
    probe_seconds: float,
    source: str,
    seed: int = 0,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train (or reuse from ``cache_dir``) the project model of ``entry`` on ``data.level``
    for ``budget`` seconds of wall time on ``device`` (``cpu``, ``cuda``; part of the cache
    key unless ``cpu``).

    Returns ``{"path", "seconds" (the train() call), "loop_seconds", "steps" (trained),
    "horizon" (the schedule's steps), "rate", "cached", "task", "settings"}``.
    """
    level = data.level
    task, sources, voxel = train_sources(entry, data)
    options = train_options(entry, data, sizes, extra)
    key = settings_key(source, level, sizes, entry.method, budget, options, seed,
                       emdiffuse.__version__, training_code_digest(), *_on(device))  # fmt: skip
    folder = cache_dir / "models" / f"{source}-{level.key}-{entry.method}-{budget:g}s-{key}"
    meta_path = folder / "meta.json"
    if meta_path.exists() and (folder / trainer.FINAL_NAME).exists():
        meta = json.loads(meta_path.read_text())
        return {**meta, "path": str(folder / trainer.FINAL_NAME), "cached": True}
    if folder.exists():
        shutil.rmtree(folder)
    rate = planned_rate(entry, data, sizes, cache_dir, seconds=probe_seconds, seed=seed,
                        extra=extra, device=device, warmup=float(options.get("mean_warmup", 0)))  # fmt: skip
    loop_budget = budget * (1 - refit_share(options))
    horizon = max(10, math.ceil(rate["steps_per_second"] * loop_budget * horizon_margin(options)))
    options.update(val_every=horizon, ckpt_every=horizon)
    start = time.perf_counter()
    path = trainer.train(task, sources, folder, steps=horizon, seed=seed, progress=progress,
                         voxel_size=voxel, device=device, time_limit=budget, **options)  # fmt: skip
    seconds = time.perf_counter() - start
    meta = {"task": task, "method": entry.method, "objective": options["objective"],
            "budget_seconds": budget, "seconds": seconds, "horizon": horizon,
            **_run_record(folder), "rate": rate, "settings": options, "seed": seed,
            "params": _count_params(path), "device": device}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=1))
    return {**meta, "path": str(path), "cached": False}


def horizon_margin(options: dict[str, Any]) -> float:
    """How far past the probe's estimate a run with ``options`` sets its steps: a cosine
    that follows the clock (a library with ``lr_follows_time``, not turned off) needs the
    steps only as a cap; a schedule by steps, or a mean warm-up (a share of the steps),
    wants them just past where time will stop the run."""
    clock = "lr_follows_time" in field_names() and options.get("lr_follows_time", True)
    if clock and not options.get("mean_warmup"):
        return CLOCK_HORIZON_MARGIN
    return HORIZON_MARGIN


def refit_share(options: dict[str, Any]) -> float:
    """The share of the time limit a run with ``options`` keeps for refitting its error head
    at the end (``error_refit_share``; 0 for a model without a head or a refit, or a library
    without either)."""
    if "error_refit_share" not in field_names() or options.get("objective") != "residual":
        return 0.0
    d = defaults()
    channels = dict(options.get("mean_net") or {}).get("error_channels", DEFAULT_ERROR_CHANNELS)
    if not channels or options.get("error_refit_steps", d["error_refit_steps"]) == 0:
        return 0.0
    return float(options.get("error_refit_share", d["error_refit_share"]))


def _on(device: str) -> tuple[str, ...]:
    """``device`` as a cache-key part: nothing for ``cpu``, so the CPU keys stay as they were."""
    return () if device == "cpu" else (device,)


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


def _find_level(info: Any, path: str = "") -> tuple[str, float] | None:
    """The first float in (0, 1) (or a percentage) under a key naming a coverage level."""
    if isinstance(info, dict):
        for k, v in info.items():
            name = str(k).lower()
            if any(w in name for w in ("level", "coverage", "confidence", "alpha")) and isinstance(
                v, (int, float)
            ) and not isinstance(v, bool):  # fmt: skip
                value = float(v) / (100.0 if 1.0 < float(v) < 100.0 else 1.0)
                if "alpha" in name:
                    value = 1.0 - value
                if 0.0 < value < 1.0:
                    return f"{path}{k}", value
            found = _find_level(v, f"{path}{k}.")
            if found:
                return found
    return None


def uncertainty_meaning(image: Path) -> dict[str, Any]:
    """What the ``uncertainty/`` image holds, from its ``emdiffuse`` zarr attribute:
    ``{"kind": "half-width", "level": 0.9, …}`` when it names an interval level (a
    calibrated checkpoint), else ``{"kind": "std"}`` (the sample standard deviation)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(image), mode="r").attrs)
    except Exception as error:  # noqa: BLE001 - report, do not fail the run
        return {"kind": "std", "note": f"attributes unreadable: {type(error).__name__}"}
    info = attrs.get("emdiffuse", {})
    info = info if isinstance(info, dict) else {}
    keep = {k: v for k, v in info.items() if k not in ("voxel_size_nm", "translation_nm")}
    stated = info.get("uncertainty")  # e.g. "half-width" (with "level") or "std"
    found = _find_level(info)
    if isinstance(stated, str):
        if "half" in stated.lower() or "interval" in stated.lower():
            if found is None:
                return {"kind": "std", "attrs": keep, "note": f"{stated!r} without a level"}
            return {"kind": "half-width", "level": found[1], "attr": found[0], "attrs": keep}
        return {"kind": "std", "attrs": keep}
    if found is None:
        return {"kind": "std", "attrs": keep}
    return {"kind": "half-width", "level": found[1], "attr": found[0], "attrs": keep}


def run_enhance(
    model: str | Path,
    source: Path,
    out: Path,
    *,
    samples: int,
    seed: int,
    steps: int | None = None,
    sampler: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``emdiffuse.enhance`` of ``source`` into ``out`` on the in-process threaded scheduler.

    ``samples=0`` asks for the posterior mean (one network evaluation); ``options``: more
    of ``enhance``'s settings (``spacing``, ``start_noise``). Returns ``{"mean",
    "uncertainty" (None for one sample, and for the mean of a model without an error head),
    "uncertainty_meaning", "seconds", "steps",
    "sampler", …}``, or ``{"error": why}`` when the library refuses the request.
    """
    sampler = enhance_defaults()["sampler"] if sampler is None else sampler
    start = time.perf_counter()
    try:
        result = enhance(source, model, out, steps=steps, samples=samples, seed=seed,
                         sampler=sampler, dtype="float32", overwrite=True, scheduler="threads",
                         workers=1, progress=False, **options)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - e.g. samples=0 before the mean mode lands
        return {"error": f"{type(error).__name__}: {error}", "samples": samples}
    mean = np.asarray(result.values, dtype=np.float32)
    seconds = time.perf_counter() - start
    unc, meaning = None, None
    if samples != 1 and (out / "uncertainty").exists():  # N samples, or the mean's error head
        unc = np.asarray(io.open_volume(str(out / "uncertainty")).data.compute(), np.float32)
        meaning = uncertainty_meaning(out / "uncertainty")
    # the steps and spacing the run resolved (None: the model's defaults)
    record = read_run_config(out)
    return {"mean": mean, "uncertainty": unc, "uncertainty_meaning": meaning,
            "seconds": seconds, "steps": int(record["steps"]), "spacing": record["spacing"],
            "sampler": sampler, "samples": samples, "seed": seed}  # fmt: skip


def level_work_dir(cache_dir: Path, source: str, level: Level) -> Path:
    """Scratch folder of a level's OME-Zarr inputs and outputs (outside the repository)."""
    path = cache_dir / "work" / source / level.key
    path.mkdir(parents=True, exist_ok=True)
    return path
