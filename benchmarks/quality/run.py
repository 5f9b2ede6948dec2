"""Quality benchmark (issues 7 and 14): emdiffuse against the degraded input, classical
baselines, an L1 regression UNet of the same size and CAREamics (Noise2Void, CARE), every
learned method trained for the same wall-clock budget on the same cores — denoising,
super-resolution and isotropic reconstruction on held-out data with ground truth, from two
sources: the synthetic EM generator and real FIB-SEM (FlyEM). Both axes of quality (PSNR,
SSIM; FRC, power-spectrum error), the intensity bias, and the calibration of the
uncertainty map; the report checks issue 14's targets.

    python benchmarks/quality/run.py --source synthetic      # about 2 h on 2 CPU cores
    python benchmarks/quality/run.py --source flyem          # about 7 h (two budgets)
    python benchmarks/quality/run.py --source flyem --quick  # smoke run, a few minutes
    python benchmarks/quality/run.py --report-only           # rewrite quality.md

Each source writes ``<out>/<source>/`` (``quality.json``, PNG figures); ``<out>/quality.md``
is rebuilt from every ``<out>/*/quality.json`` present. ``<out>`` is
``benchmarks/results/quality``; ``--quick`` writes to ``<cache>/quick-results`` unless
``--out`` is given. Trained models, CAREamics results and scratch OME-Zarr live in
``~/.cache/emdiffuse/quality`` (or ``$EMDIFFUSE_CACHE/quality``, or ``--cache``), keyed on
their settings: a second run reuses them and only re-evaluates. CAREamics runs in its own
venv (``--peers-python``, default ``.venv-peers/bin/python``); see
``benchmarks/quality/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import quality_linear as ql
import torch
from quality_classical import bicubic_xy, gaussian, interpolate_z, nearest_xy, nlm, tune_denoisers
from quality_data import (
    FLYEM_DIR,
    SOURCES,
    TASKS,
    TEST_NOISE_SEEDS,
    TRAIN_NOISE_SEED,
    Neighbours,
    Sizes,
    Source,
    TaskData,
    make_source,
)
from quality_figures import calibration_plot, frc_curves, metric_bars, panel, real_em_figure
from quality_peers import context_inputs, peer_inputs, run_peer
from quality_plan import (
    PROJECT,
    QUICK_SCALE,
    Entry,
    applies,
    budget_label,
    default_plan,
    parse_plan,
)
from quality_project import (
    enhance_defaults,
    features,
    level_work_dir,
    model_name,
    run_enhance,
    train_model,
    train_settings,
    write_input,
)
from quality_report import write_markdown
from quality_scores import frc_curve, score, uncertainty_scores

import emdiffuse
from emdiffuse.training.settings import SINGLE_NETWORK_BATCH

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "quality"
REAL_EM_PATCHES = 4
PROBE_SECONDS = {"full": 20.0, "quick": 2.0}  # our trainer's rate probe
PEER_PROBE_STEPS = {"full": 40, "quick": 6}  # CAREamics' rate probe
PEER_NAMES = {"n2v": "N2V (CAREamics)", "care": "CARE (CAREamics)"}


def default_cache() -> Path:
    """``$EMDIFFUSE_CACHE/quality`` or ``~/.cache/emdiffuse/quality``."""
    base = os.environ.get("EMDIFFUSE_CACHE") or Path.home() / ".cache" / "emdiffuse"
    return Path(base) / "quality"


class LevelRun:
    """Collects the outputs of every method on one level, then scores them."""

    def __init__(self, data: TaskData, scale: float = 1.0) -> None:
        self.data = data
        self.scale = scale  # training seconds per nominal budget second (--quick)
        self.methods: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.skipped: list[dict[str, str]] = []
        self.panel_uncertainty: tuple[np.ndarray, str] | None = None  # the first map written

    def add(self, method: str, group: str, output: np.ndarray, *, family: str = "",
            mode: str = "", entry: Entry | None = None, train: dict | None = None,
            pair: np.ndarray | None = None, pair_what: str = "", seconds: float = math.nan,
            uncertainty: dict | None = None, note: str = "") -> None:  # fmt: skip
        """A method's output on the truth's grid (and an independent second reconstruction).
        ``mode``: the emdiffuse output (mean, 1 sample, mean of N); ``entry``: the plan
        entry a learned method comes from (its budget); ``train``: its training record."""
        label = method + (f" — {mode}" if mode else "")
        if entry is not None:
            label += f" [{budget_label(entry.budget * self.scale)}]"
        self.methods.append({
            "label": label, "method": method, "mode": mode, "group": group,
            "family": family or group, "output": output, "pair": pair, "pair_what": pair_what,
            "seconds": seconds, "note": note, "uncertainty": uncertainty, "train": train,
            "plan": entry.token if entry else None, "budget_s": entry.budget if entry else None,
            "train_budget_s": entry.budget * self.scale if entry else None,
        })  # fmt: skip

    def skip(self, what: str, why: str) -> None:
        print(f"    skipped {what}: {why[:200]}", flush=True)
        self.skipped.append({"what": what, "why": why})

    def rows(self) -> list[dict[str, Any]]:
        """Scores of every method (JSON-able)."""
        d = self.data
        rows = []
        keep = ("label", "method", "mode", "group", "family", "pair_what", "seconds", "note",
                "train", "plan", "budget_s", "train_budget_s", "uncertainty")  # fmt: skip
        for m in self.methods:
            values = score(m["output"], d.truth, d.eval_z, d.voxel_nm, m["pair"])
            rows.append({k: m[k] for k in keep} | values
                        | {"frc_curve": frc_curve(m["output"], d.truth, d.eval_z)})  # fmt: skip
        return rows


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def linear_filter_row(run: LevelRun) -> None:
    """The least-squares linear filter from the condition to the target (a Wiener filter
    learned from the training data, :mod:`quality_linear`): the start of the isotropic mean
    network, a classical peer of every task."""
    d = run.data
    outs, t = _timed(ql.restore, d, ql.SIZE, np.random.default_rng(0))
    pair = outs[1] if len(outs) > 1 else None
    run.add(f"least-squares linear filter ({ql.SIZE}×{ql.SIZE})", "classical", outs[0],
            family="linear filter", pair=pair,
            pair_what="noise realisations A vs B" if pair is not None else "",
            seconds=t / len(outs))  # fmt: skip


def classical(run: LevelRun, sizes: Sizes) -> dict[str, Any]:
    """The degraded input and the classical baselines of the level's task (the tuned
    denoisers' parameters), the learned linear filter last."""
    tuned = input_and_filters(run, sizes)
    linear_filter_row(run)
    return tuned


def input_and_filters(run: LevelRun, sizes: Sizes) -> dict[str, Any]:
    """The degraded input and the task's hand-made filters and interpolations."""
    d = run.data
    level, k = d.level, d.level.factor
    if level.task == "denoise":
        a, b = d.test_inputs
        pair_what = "noise realisations A vs B"
        run.add("input (noisy)", "input", a, pair=b, pair_what=pair_what, seconds=0.0)
        n, s = sizes.tune_slices, sizes.tune_yx
        tuned = tune_denoisers(d.train["noisy"][:n, :s, :s], d.train["clean"][:n, :s, :s])
        sigma = tuned["gaussian"]["sigma"]
        (ga, gb), t = _timed(lambda: (gaussian(a, sigma), gaussian(b, sigma)))
        run.add(f"Gaussian filter (σ = {sigma:g} px)", "classical", ga, pair=gb,
                pair_what=pair_what, seconds=t / 2)  # fmt: skip
        p = tuned["nlm"]
        args = (p["h_over_sigma"], (p["patch_size"], p["patch_distance"]))
        (na, nb), t = _timed(lambda: (nlm(a, *args), nlm(b, *args)))
        run.add(f"non-local means (h = {p['h_over_sigma']:g}σ, patch {p['patch_size']})",
                "classical", na, pair=nb, pair_what=pair_what, seconds=t / 2)  # fmt: skip
        return tuned
    if level.task == "super-resolve":
        low = d.test_inputs[0]
        run.add("input (nearest)", "input", nearest_xy(low, k), seconds=0.0)
        up, t = _timed(bicubic_xy, low, k)
        run.add("bicubic", "classical", up, seconds=t)
        return {}
    slices = d.test_inputs[0]
    run.add("input (nearest slice)", "input", interpolate_z(slices, k, "nearest"), seconds=0.0)
    for kind in ("linear", "cubic"):
        vol, t = _timed(interpolate_z, slices, k, kind)
        run.add("linear interpolation in z" if kind == "linear" else "cubic spline in z",
                "classical", vol, family=f"{kind} z", seconds=t)  # fmt: skip
    return {}


class Context:
    """What every level of a run shares: source, sizes, cache, options, test inputs."""

    def __init__(self, source: Source, sizes: Sizes, cache: Path, args, mode: str) -> None:
        self.source, self.sizes, self.cache, self.args, self.mode = source, sizes, cache, args, mode
        self.scale = QUICK_SCALE if mode == "quick" else 1.0
        self.extra = train_extra(args, mode)

    def budget(self, entry: Entry) -> float:
        """Seconds of training for ``entry`` (its nominal budget, scaled by --quick)."""
        return entry.budget * self.scale


def train_extra(args, mode: str) -> dict[str, Any]:
    """Extra trainer settings: the end-of-training calibration with the N of the mean-of-N
    rows (fewer patches in a quick run), then ``--train-set``; only fields the installed
    TrainSettings has."""
    from emdiffuse.training.settings import field_names

    extra: dict[str, Any] = {"calibration_samples": args.samples}
    if mode == "quick":
        extra["calibration_patches"] = 4
    extra.update(dict(args.train_set or []))
    return {k: v for k, v in extra.items() if k in field_names()}


def _train_record(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("budget_seconds", "seconds", "loop_seconds", "steps",
                                     "horizon", "cached", "params", "objective")} | {
        "rate": (meta.get("rate") or {}).get("steps_per_second")}  # fmt: skip


def project_entry(run: LevelRun, ctx: Context, entry: Entry, inputs: list[Path],
                  models: dict[str, Any], scored: np.ndarray | None = None) -> None:  # fmt: skip
    """Train (or reuse) one project model and enhance the test input(s) with it through
    ``emdiffuse.enhance``: the regression UNet in one evaluation; the emdiffuse kinds as
    the posterior mean (``samples=0``), one sample and the mean of N. ``scored``: the
    slices of the inputs that are scored (inputs with neighbouring slices, for a model
    reading z)."""
    d, args = run.data, ctx.args
    task = d.level.task
    if entry.kind == "residual" and not features()["residual"]:
        run.skip(entry.token, "the installed emdiffuse has no 'residual' objective yet "
                 f"(objectives: {', '.join(features()['objectives'])})")  # fmt: skip
        return
    name = model_name(entry, task)
    budget = ctx.budget(entry)
    print(f"  train {name} for {budget:g} s", flush=True)
    try:
        meta = train_model(entry, d, ctx.sizes, ctx.cache, budget=budget,
                           probe_seconds=PROBE_SECONDS[ctx.mode], source=ctx.source.name,
                           seed=args.seed, progress=args.progress, extra=ctx.extra)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - one failed model must not end the run
        run.skip(entry.token, f"training failed: {type(error).__name__}: {error}")
        return
    print(f"    {meta['seconds']:.0f} s, {meta.get('steps')} steps of {meta['horizon']}"
          f"{' (cached)' if meta['cached'] else ''}", flush=True)  # fmt: skip
    models[entry.token] = meta
    train = _train_record(meta)
    work = level_work_dir(ctx.cache, ctx.source.name, d.level)
    denoise = task == "denoise"
    s0, s1 = args.seed, args.seed + 1
    tag = entry.token.replace("@", "_")

    def enh(what: str, source: Path, **kw) -> dict[str, Any]:
        if entry.kind != "regression":  # --enhance-set: another sampling of the same model
            kw = {**dict(args.enhance_set or []), **kw}
        r = run_enhance(meta["path"], source, work / f"{tag}_{what}.ome.zarr", **kw)
        if "error" in r:
            return r
        if scored is not None:  # the neighbouring slices are read, not scored
            r["mean"] = r["mean"][scored]
            if r["uncertainty"] is not None:
                r["uncertainty"] = r["uncertainty"][scored]
        run.timings[f"enhance {entry.token} {what}"] = r["seconds"]
        print(f"    enhance {what}: {r['seconds']:.1f} s", flush=True)
        return r

    if entry.kind == "regression":
        a = enh("A", inputs[0], samples=1, seed=s0, steps=1)
        b = enh("B", inputs[1], samples=1, seed=s1, steps=1) if denoise else None
        if "error" in a:
            run.skip(entry.token, f"enhance failed: {a['error']}")
            return
        run.add(name, "learned", a["mean"], family="regression", entry=entry, train=train,
                pair=None if b is None else b["mean"],
                pair_what="noise realisations A vs B" if denoise else "",
                seconds=a["seconds"], note="1 network evaluation")  # fmt: skip
        return
    # the posterior mean: one network evaluation (samples=0), where the library offers it
    mean_a = enh("mean_A", inputs[0], samples=0, seed=s0)
    if "error" in mean_a:
        run.skip(f"{entry.token} mean (samples=0)", mean_a["error"])
    else:
        mean_b = enh("mean_B", inputs[1], samples=0, seed=s1) if denoise else None
        ok_b = mean_b is not None and "error" not in mean_b
        unc = None  # a model with an error head writes the mean's intervals
        if mean_a["uncertainty"] is not None:
            unc = uncertainty_scores(mean_a["mean"], mean_a["uncertainty"], d.truth, d.eval_z,
                                     mean_a["uncertainty_meaning"])  # fmt: skip
        run.add(name, "emdiffuse", mean_a["mean"], family=entry.family, mode="mean (1 NFE)",
                entry=entry, train=train, pair=mean_b["mean"] if ok_b else None,
                pair_what="noise realisations A vs B" if ok_b else "",
                seconds=mean_a["seconds"], uncertainty=unc)  # fmt: skip
    one = enh("s1_A", inputs[0], samples=1, seed=s0)
    if "error" in one:
        run.skip(f"{entry.token} 1 sample", one["error"])
        return
    if denoise:
        one_b = enh("s1_B", inputs[1], samples=1, seed=s1)
        what = "noise realisations A vs B, sampler seeds 0 vs 1"
    else:
        one_b = enh("s1_seed1_A", inputs[0], samples=1, seed=s1)
        what = "same input, sampler seeds 0 vs 1"
    run.add(name, "emdiffuse", one["mean"], family=entry.family, mode="1 sample", entry=entry,
            train=train, pair=one_b.get("mean"), pair_what=what if "mean" in one_b else "",
            seconds=one["seconds"])  # fmt: skip
    n = args.samples
    many = enh(f"m{n}_A", inputs[0], samples=n, seed=s0)
    if "error" in many:
        run.skip(f"{entry.token} mean of {n}", many["error"])
        return
    many_b = enh(f"m{n}_B", inputs[1], samples=n, seed=s1) if denoise else None
    unc = None
    if many["uncertainty"] is not None:
        unc = uncertainty_scores(many["mean"], many["uncertainty"], d.truth, d.eval_z,
                                 many["uncertainty_meaning"])  # fmt: skip
    ok_b = many_b is not None and "error" not in many_b
    run.add(name, "emdiffuse", many["mean"], family=entry.family, mode=f"mean of {n}", entry=entry,
            train=train, pair=many_b["mean"] if ok_b else None,
            pair_what="noise realisations A vs B, sampler seeds 0 vs 1" if ok_b else "",
            seconds=many["seconds"], uncertainty=unc)  # fmt: skip
    if many["uncertainty"] is not None and run.panel_uncertainty is None:
        run.panel_uncertainty = (many["uncertainty"], f"uncertainty ({unc['map']}), {name} "
                                 f"[{budget_label(ctx.budget(entry))}]")  # fmt: skip


def peer_entry(run: LevelRun, ctx: Context, entry: Entry, arrays: dict[str, Any],
               info: dict[str, Any]) -> None:  # fmt: skip
    """One CAREamics model (N2V or CARE) trained for the entry's budget."""
    d, args = run.data, ctx.args
    k = d.level.factor
    algorithm = entry.method
    print(f"  CAREamics {algorithm} for {ctx.budget(entry):g} s", flush=True)
    result = run_peer(algorithm, arrays, d, ctx.sizes, ctx.cache, args.peers_python,
                      budget=ctx.budget(entry), source=ctx.source.name,
                      batch_size=args.peer_batch or SINGLE_NETWORK_BATCH,
                      probe_steps=PEER_PROBE_STEPS[ctx.mode], seed=args.seed,
                      threads=args.threads)  # fmt: skip
    if "error" in result:
        run.skip(entry.token, result["error"])
        info[entry.token] = {"error": result["error"]}
        return
    meta = result["meta"]
    print(f"    {meta['train_seconds']:.0f} s training, {meta['steps']} steps"
          f"{' (cached)' if meta.get('cached') else ''}", flush=True)  # fmt: skip
    info[entry.token] = meta
    train = {"budget_seconds": meta.get("budget_seconds"), "seconds": meta["train_seconds"],
             "loop_seconds": meta.get("loop_seconds"), "steps": meta["steps"],
             "horizon": meta.get("planned_steps"), "cached": meta.get("cached", False),
             "params": meta.get("params"), "rate": (meta.get("rate") or {}).get("steps_per_second"),
             "epochs": meta.get("epochs")}  # fmt: skip
    preds = result["predictions"]
    label = PEER_NAMES[entry.kind] + entry.reads
    seconds = float(meta["predict_seconds"].get("A", math.nan))
    if d.level.task == "isotropic":
        volume = interpolate_z(d.test_inputs[0], k, "cubic")
        volume[d.eval_z] = preds["A"]
        run.add(label, "learned", volume, family=algorithm, entry=entry, train=train,
                seconds=seconds)  # fmt: skip
    elif d.level.task == "denoise":
        run.add(label, "learned", preds["A"], family=algorithm, entry=entry, train=train,
                pair=preds["B"], pair_what="noise realisations A vs B", seconds=seconds)  # fmt: skip
    else:
        run.add(label, "learned", preds["A"], family=algorithm, entry=entry, train=train,
                seconds=seconds)  # fmt: skip


def neighbour_inputs(ctx: Context, data: TaskData, context: int) -> tuple[Neighbours, list[Path]]:
    """The denoise test inputs with ``context`` neighbours of each scored slice, checked
    against the test inputs (the same keyed noise), and written as OME-Zarr."""
    nb = ctx.source.neighbours(data.level, ctx.sizes, context)
    pairs = zip(nb.volumes, data.test_inputs, strict=True)
    if not all(np.array_equal(v[nb.scored], x) for v, x in pairs):
        raise ValueError("the neighbours' scored slices are not the test inputs: noise keying "
                         "changed")  # fmt: skip
    work = level_work_dir(ctx.cache, ctx.source.name, data.level)
    paths = [write_input(v, work / f"input_z{context}_{n}.ome.zarr", data.input_voxel)
             for n, v in zip("AB", nb.volumes, strict=True)]  # fmt: skip
    return nb, paths


def evaluate_level(ctx: Context, level, clean_train: np.ndarray, plan: list[Entry]):
    """Every method on one level: (JSON summary, images for the figures)."""
    start = time.perf_counter()
    data = ctx.source.task_data(level, ctx.sizes, clean_train)
    run = LevelRun(data, ctx.scale)
    tuned, t = _timed(classical, run, ctx.sizes)
    run.timings["classical (tuning + apply)"] = t
    work = level_work_dir(ctx.cache, ctx.source.name, level)
    inputs = [write_input(x, work / f"input_{n}.ome.zarr", data.input_voxel)
              for n, x in zip("AB", data.test_inputs, strict=False)]  # fmt: skip
    models: dict[str, Any] = {}
    peers: dict[str, Any] = {}
    arrays = None
    z: dict[int, tuple[Neighbours, list[Path]]] = {}  # test inputs with neighbours, per context
    for entry in (e for e in plan if applies(e, level.task)):
        c = entry.z_context
        if c and c not in z:
            z[c] = neighbour_inputs(ctx, data, c)
        if entry.method in PROJECT:
            project_entry(run, ctx, entry, z[c][1] if c else inputs, models,
                          z[c][0].scored if c else None)  # fmt: skip
        elif ctx.args.no_peers:
            peers[entry.token] = {"skipped": "--no-peers"}
        elif c:
            peer_entry(run, ctx, entry, context_inputs(data, z[c][0]), peers)
        else:
            arrays = arrays or peer_inputs(data)
            peer_entry(run, ctx, entry, arrays[entry.method], peers)
    rows, t = _timed(run.rows)
    run.timings["scoring"] = t
    run.timings["level total"] = time.perf_counter() - start
    summary = {
        "task": level.task, "label": level.label, "level": level.__dict__,
        "rows": rows, "models": {k: {k2: v for k2, v in m.items() if k2 != "path"}
                                 | {"path": Path(m["path"]).name} for k, m in models.items()},
        "peers": peers, "skipped": run.skipped, "classical_tuning": tuned,
        "timings": run.timings, "test_shape_truth": list(data.truth.shape),
        "test_input_shape": list(data.test_inputs[0].shape), "eval_slices": data.eval_z.tolist(),
        "input_voxel_nm": list(data.input_voxel), "voxel_nm": data.voxel_nm,
    }  # fmt: skip
    view = "xz" if level.task == "isotropic" else "xy"
    unc = run.panel_uncertainty
    images = {
        "key": level.key, "task": level.task, "label": level.label, "view": view,
        "z": int(data.eval_z[len(data.eval_z) // 2]),
        "columns": [("truth", data.truth)] + [(m["label"], m["output"]) for m in run.methods],
        "uncertainty": None if unc is None else unc[0],
        "uncertainty_title": "" if unc is None else unc[1],
        "model_paths": {k: m["path"] for k, m in models.items()},
    }  # fmt: skip
    return summary, images


def real_em(folder: Path, model: str, cache: Path, out: Path, seed: int) -> dict[str, Any]:
    """The trained synthetic denoiser on real EM patches (no ground truth): input | output |
    uncertainty. Normalised with the global percentiles of the whole patch set."""
    import tifffile

    from emdiffuse.models.checkpoints import load_checkpoint

    if not folder.is_dir():
        return {"skipped": f"{folder} does not exist"}
    files = sorted(folder.glob("*.tif"))
    if not files:
        return {"skipped": f"no .tif files in {folder}"}
    stack = np.stack([tifffile.imread(f) for f in files]).astype(np.float64)
    low, high = np.percentile(stack, (0.5, 99.5))  # global over the patch set, never per tile
    config, _ = load_checkpoint(model)
    norm = config.normalization
    if not {"low", "high"} <= set(norm):
        return {"skipped": f"the checkpoint's normalisation has no low/high: {sorted(norm)}"}
    m_low, m_high = norm["low"], norm["high"]
    picks = np.linspace(0, len(files) - 1, REAL_EM_PATCHES).round().astype(int)
    mapped = m_low + (stack[picks] - low) / (high - low) * (m_high - m_low)
    work = cache / "work" / "real_em"
    work.mkdir(parents=True, exist_ok=True)
    source = write_input(mapped.astype(np.float32), work / "input.ome.zarr", (8.0,) * 3)
    result = run_enhance(model, source, work / "enhanced.ome.zarr", samples=4, seed=seed)
    if "error" in result:
        return {"skipped": result["error"]}
    names = [files[i].name for i in picks]
    meaning = result.get("uncertainty_meaning") or {"kind": "std"}
    label = (f"uncertainty ({meaning['level']:.0%} half-width)"
             if meaning["kind"] == "half-width" else "uncertainty (std)")  # fmt: skip
    real_em_figure(stack[picks], result["mean"], result["uncertainty"], names,
                   out / "real_em.png", label)  # fmt: skip
    return {"folder": str(folder), "patches": names, "n_patch_set": len(files),
            "percentiles_0.5_99.5": [float(low), float(high)],
            "model_normalization": [m_low, m_high], "samples": 4,
            "seconds": result["seconds"], "figure": "real_em.png",
            "mean_uncertainty_model_units": float(np.mean(result["uncertainty"]))}  # fmt: skip


def _peer_versions(python: Path) -> dict[str, str]:
    if not python.exists():
        return {}
    code = "import careamics, torch; print(careamics.__version__, torch.__version__)"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    parts = proc.stdout.split()
    return {"careamics": parts[0], "torch (peers venv)": parts[1]} if len(parts) == 2 else {}


def environment(python: Path) -> dict[str, Any]:
    """Machine, versions and commit of the run."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    import scipy
    import skimage

    return {
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU"
        if not torch.cuda.is_available() else f"{os.cpu_count()} CPU cores, GPU {torch.cuda.get_device_name()}",
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "emdiffuse": emdiffuse.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
        "scikit-image": skimage.__version__, **_peer_versions(python),
        "commit": commit + (" (+ uncommitted changes)" if dirty else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip


def provenance_record(argv: list[str] | None) -> dict:
    """The run's provenance record (``benchmarks/provenance.py``; imported here because only
    this script's own folder is on ``sys.path``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from provenance import provenance as record

    return record(None if argv is None else [__file__, *argv])


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--source",
        nargs="+",
        default=["synthetic"],
        choices=SOURCES,
        help="data source(s), run one after the other (default: synthetic)",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"smoke run: tiny regions, budgets x {QUICK_SCALE:g}"
    )
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--cache", type=Path, default=None, help="models, CAREamics results, scratch")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument(
        "--levels",
        nargs="+",
        default=None,
        metavar="KEY",
        help="only these level keys (e.g. denoise-dose2 isotropic-k4)",
    )
    p.add_argument(
        "--plan",
        nargs="+",
        default=None,
        metavar="METHOD@SECONDS",
        help="the learned methods and their budgets (default: see quality_plan.py; "
        "synthetic: its 150 s entries only)",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep only plan entries with these nominal budgets",
    )
    p.add_argument("--samples", type=int, default=4, help="N of the mean-of-N rows (>= 2)")
    p.add_argument(
        "--train-set",
        nargs="+",
        type=key_value,
        default=None,
        metavar="KEY=VALUE",
        help="extra TrainSettings fields for the project's models (JSON values)",
    )
    p.add_argument(
        "--enhance-set",
        nargs="+",
        type=key_value,
        default=None,
        metavar="KEY=VALUE",
        help="emdiffuse.enhance settings for the diffusion kinds' rows (e.g. steps=8 "
        "spacing=logsnr: the same cached model sampled another way)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip CAREamics")
    p.add_argument("--peer-batch", type=int, default=None, metavar="N",
                   help=f"CAREamics batch size (default: {SINGLE_NETWORK_BATCH}, the recipe's "
                        "for a kind with one network)")
    p.add_argument("--no-aniso", action="store_true", help="skip vemdiffuse-a")
    p.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python")
    p.add_argument(
        "--real-em", type=Path, default=ROOT.parent / "shared" / "data" / "real_em_noisy"
    )
    p.add_argument("--flyem-dir", type=Path, default=FLYEM_DIR)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="training and sampler seed")
    p.add_argument("--progress", action="store_true", help="training progress bars")
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite quality.md from the JSONs in --out"
    )
    args = p.parse_args(argv)
    if args.samples < 2:
        p.error("--samples must be >= 2 (the mean-of-N rows and the uncertainty map)")
    return args


def make_plan(source: Source, args) -> list[Entry]:
    if args.plan:
        plan = parse_plan(args.plan)
    else:
        plan = default_plan(features()["residual"])
        if source.name == "synthetic":  # the committed synthetic run: the short budget only
            plan = [e for e in plan if e.budget == min(x.budget for x in plan)]
    if args.budgets:
        plan = [e for e in plan if e.budget in args.budgets]
    if args.no_aniso:
        plan = [e for e in plan if not e.aniso]
    return plan


def run_source(name: str, args, argv, record: dict, out_root: Path, cache: Path) -> Path | None:
    """Every level of one source; writes ``<out_root>/<source>/quality.json`` and figures."""
    source = make_source(name, flyem_dir=args.flyem_dir)
    why = source.available()
    if why:
        print(f"{name}: skipped ({why})")
        return None
    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    sizes = source.quick if args.quick else source.full
    ctx = Context(source, sizes, cache, args, mode)
    plan = make_plan(source, args)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    print(f"{name} ({mode}): plan {' '.join(e.token for e in plan)}; results {out}", flush=True)
    clean_train = source.train_volume(sizes)
    levels: dict[str, Any] = {}
    images: dict[str, list] = {}
    selected = [lv for lv in source.levels if lv.task in args.tasks
                and (args.levels is None or lv.key in args.levels)]  # fmt: skip
    for level in selected:
        print(f"{level.key}: {level.label}", flush=True)
        summary, pics = evaluate_level(ctx, level, clean_train, plan)
        levels[level.key] = summary
        images.setdefault(level.task, []).append(pics)
    figures = _figures(source, levels, images, out)
    real = {"skipped": "only with the synthetic source's denoise levels"}
    if name == "synthetic" and "denoise" in images:
        first = images["denoise"][0]
        paths = first["model_paths"]
        # a model reading one slice: the real EM patches are not a volume
        pick = next((p for t, p in paths.items() if not t.startswith("regression")
                     and not parse_plan([t])[0].z_context), None)  # fmt: skip
        if pick is not None:
            real = real_em(args.real_em, pick, cache, out, args.seed)
            real["model"] = (
                f"{next(t for t, p in paths.items() if p == pick)} of level {first['key']}"
            )
    total = time.perf_counter() - start
    result = {
        "source": name, "command": "python benchmarks/quality/run.py"
        + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "mode": mode, "wall_seconds": total, "environment": environment(args.peers_python),
        "data": source.describe(sizes), "sizes": sizes.__dict__,
        "plan": [{"method": e.method, "budget_s": e.budget, "train_s": ctx.budget(e)} for e in plan],
        "budget_scale": ctx.scale, "features": features(),
        "train_settings": train_settings(sizes, ctx.extra), "train_set": ctx.extra,
        "enhance_defaults": enhance_defaults(), "enhance_set": dict(args.enhance_set or []),
        "samples": args.samples,
        "seeds": {"train_noise": TRAIN_NOISE_SEED, "test_noise": list(TEST_NOISE_SEEDS),
                  "training": args.seed, "sampler": [args.seed, args.seed + 1]},
        "voxel_nm": source.voxel_nm, "levels": levels, "real_em": real, "figures": figures,
        "provenance": record,
    }  # fmt: skip
    path = out / "quality.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default))
    print(f"{name} done in {total / 60:.1f} min: {path}", flush=True)
    return path


def _figures(source: Source, levels: dict, images: dict, out: Path) -> dict[str, str]:
    figures: dict[str, str] = {}
    curves = []
    for task, entries in images.items():
        for e in entries:
            figures[f"{e['key']}_panel"] = panel(e, out / f"{e['key']}_panel.png",
                                                 title=source.title).name  # fmt: skip
        bars = [(lv["label"], lv["rows"]) for lv in levels.values() if lv["task"] == task]
        figures[f"{task}_metrics"] = metric_bars(task, bars, out / f"{task}_metrics.png",
                                                 title=source.title).name  # fmt: skip
        figures[f"{task}_frc"] = frc_curves(task, bars, out / f"{task}_frc.png",
                                            title=source.title, voxel_nm=source.voxel_nm).name  # fmt: skip
    for key, lv in levels.items():
        for r in lv["rows"]:
            if r.get("uncertainty"):
                short = (
                    key.split("-", 1)[1] if lv["task"] != "denoise" else key.replace("denoise-", "")
                )
                curves.append({"task": lv["task"], "label": f"{r['label']} {short}",
                               **r["uncertainty"]["reliability"]})  # fmt: skip
    if curves:
        figures["calibration"] = calibration_plot(curves, out / "calibration.png").name
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = (args.cache or default_cache()).resolve()
    out_root = (args.out or (cache / "quick-results" if args.quick else RESULTS)).resolve()
    if args.report_only:
        return report(out_root)
    record = provenance_record(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals in small trained nets slow CPU inference
    print(f"quality benchmark: results {out_root}, cache {cache}; library features {features()}")
    ran = [run_source(name, args, argv, record, out_root, cache) for name in args.source]
    if not any(ran) and not out_root.is_dir():
        print("quality benchmark: no source could run (see above); nothing written",
              file=sys.stderr)  # fmt: skip
        return 2
    return report(out_root)


def report(out_root: Path) -> int:
    """Write ``quality.md`` in ``out_root``; a broken run index is one line and exit 2."""
    try:
        print(f"report: {write_markdown(out_root)}")
    except ValueError as error:
        print(f"quality benchmark: {error}", file=sys.stderr)
        return 2
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
