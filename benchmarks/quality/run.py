"""Quality benchmark (issue 7): emdiffuse against the degraded input, classical baselines,
a regression UNet of the same size trained on the same data for the same steps, and
CAREamics (Noise2Void, CARE), on held-out synthetic EM with ground truth — denoising,
super-resolution and isotropic reconstruction, two difficulty levels each; PSNR, SSIM, FRC
resolution, and the calibration of the uncertainty map.

    python benchmarks/quality/run.py            # the committed run (about an hour, 2 CPU cores)
    python benchmarks/quality/run.py --quick    # smoke run: tiny volumes and budgets

Writes ``benchmarks/results/quality/`` (``quality.json``, ``quality.md``, PNG figures);
``--quick`` writes to ``<cache>/quick-results`` unless ``--out`` is given. Trained models,
CAREamics results and scratch OME-Zarr live in ``~/.cache/emdiffuse/quality`` (or
``$EMDIFFUSE_CACHE/quality``, or ``--cache``), keyed on their settings: a second run reuses
them and only re-evaluates. CAREamics runs in its own venv (``--peers-python``, default
``.venv-peers/bin/python``); see ``benchmarks/quality/README.md``.
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
import torch
from quality_classical import bicubic_xy, gaussian, interpolate_z, nearest_xy, nlm, tune_denoisers
from quality_data import (
    FULL,
    LEVELS,
    QUICK,
    TASKS,
    TEST_NOISE_SEEDS,
    TEST_ORIGIN,
    TRAIN_NOISE_SEED,
    TRAIN_ORIGIN,
    VOXEL_NM,
    WORLD_SEED,
    Level,
    Sizes,
    TaskData,
    clean_block,
    make_task_data,
)
from quality_figures import calibration_plot, metric_bars, panel, real_em_figure
from quality_peers import peer_inputs, run_peer
from quality_project import (
    enhance_defaults,
    level_work_dir,
    run_enhance,
    train_model,
    train_settings,
    write_input,
)
from quality_report import write_markdown
from quality_scores import calibration, frc_curve, score

import emdiffuse

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "quality"
VARIANT = {"denoise": "emdiffuse-n", "super-resolve": "emdiffuse-r", "isotropic": "vemdiffuse-i"}
REAL_EM_PATCHES = 4


def default_cache() -> Path:
    """``$EMDIFFUSE_CACHE/quality`` or ``~/.cache/emdiffuse/quality``."""
    base = os.environ.get("EMDIFFUSE_CACHE") or Path.home() / ".cache" / "emdiffuse"
    return Path(base) / "quality"


class LevelRun:
    """Collects the outputs of every method on one level, then scores them."""

    def __init__(self, data: TaskData) -> None:
        self.data = data
        self.methods: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}

    def add(self, method: str, group: str, output: np.ndarray, *, pair: np.ndarray | None = None,
            pair_what: str = "", seconds: float = math.nan, note: str = "") -> None:  # fmt: skip
        """A method's output on the truth's grid (and an independent second reconstruction)."""
        self.methods.append({"method": method, "group": group, "output": output, "pair": pair,
                             "pair_what": pair_what, "seconds": seconds, "note": note})  # fmt: skip

    def rows(self) -> list[dict[str, Any]]:
        """Scores of every method (JSON-able)."""
        d = self.data
        rows = []
        for m in self.methods:
            values = score(m["output"], d.truth, d.eval_z, m["pair"])
            rows.append({k: m[k] for k in ("method", "group", "pair_what", "seconds", "note")}
                        | values | {"frc_curve": frc_curve(m["output"], d.truth, d.eval_z)})  # fmt: skip
        return rows


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def classical(run: LevelRun, sizes: Sizes) -> dict[str, Any]:
    """The degraded input and the classical baselines of the level's task."""
    d = run.data
    level, k = d.level, d.level.factor
    if level.task == "denoise":
        a, b = d.test_inputs
        pair_what = "noise realisations A vs B"
        run.add("input (noisy)", "input", a, pair=b, pair_what=pair_what, seconds=0.0)
        n = sizes.tune_slices
        tuned = tune_denoisers(d.train["noisy"][:n], d.train["clean"][:n])
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
        run.add(f"{kind} interpolation in z" if kind == "linear" else "cubic spline in z",
                "classical", vol, seconds=t)  # fmt: skip
    return {}


def project_models(run: LevelRun, sizes: Sizes, cache: Path, args) -> dict[str, Any]:
    """Train (or reuse) the project's models and enhance the test volume(s) through
    ``emdiffuse.enhance``; returns training budgets, calibration and the uncertainty map."""
    d = run.data
    level = d.level
    work = level_work_dir(cache, level)
    kinds = ["diffusion", "regression"]
    if level.task == "isotropic" and not args.no_aniso:
        kinds.append("diffusion-a")
    models = {}
    for kind in kinds:
        print(f"  train {kind} ({sizes.steps} steps)", flush=True)
        models[kind] = train_model(kind, d, sizes, cache, seed=args.seed, progress=args.progress)
        print(f"    {models[kind]['seconds']:.0f} s{' (cached)' if models[kind]['cached'] else ''}",
              flush=True)  # fmt: skip
    inputs = [write_input(x, work / f"input_{n}.ome.zarr", d.input_voxel)
              for n, x in zip("AB", d.test_inputs, strict=False)]  # fmt: skip
    denoise = level.task == "denoise"
    s0, s1 = args.seed, args.seed + 1

    def enh(kind: str, tag: str, source: Path, **kw) -> dict[str, Any]:
        r = run_enhance(models[kind]["path"], source, work / f"{kind}_{tag}.ome.zarr", **kw)
        run.timings[f"enhance {kind} {tag}"] = r["seconds"]
        print(f"  enhance {kind} {tag}: {r['seconds']:.1f} s", flush=True)
        return r

    reg = enh("regression", "A", inputs[0], samples=1, seed=s0, steps=1)
    reg_b = enh("regression", "B", inputs[1], samples=1, seed=s1, steps=1) if denoise else None
    run.add("regression UNet (L1, same net, 1 evaluation)", "learned", reg["mean"],
            pair=None if reg_b is None else reg_b["mean"],
            pair_what="noise realisations A vs B" if denoise else "",
            seconds=reg["seconds"])  # fmt: skip
    calib, uncertainty = {}, None
    for kind in kinds:
        if kind == "regression":
            continue
        name = "vemdiffuse-a" if kind == "diffusion-a" else VARIANT[level.task]
        one = enh(kind, "s1_A", inputs[0], samples=1, seed=s0)
        four = enh(kind, "m4_A", inputs[0], samples=4, seed=s0)
        if denoise:
            one_b = enh(kind, "s1_B", inputs[1], samples=1, seed=s1)
            four_b = enh(kind, "m4_B", inputs[1], samples=4, seed=s1)
            what = "noise realisations A vs B, sampler seeds 0 vs 1"
            run.add(f"{name}, 1 sample", "emdiffuse", one["mean"], pair=one_b["mean"],
                    pair_what=what, seconds=one["seconds"])  # fmt: skip
            run.add(f"{name}, mean of 4", "emdiffuse", four["mean"], pair=four_b["mean"],
                    pair_what=what, seconds=four["seconds"])  # fmt: skip
        else:
            one_b = enh(kind, "s1_seed1_A", inputs[0], samples=1, seed=s1)
            run.add(f"{name}, 1 sample", "emdiffuse", one["mean"], pair=one_b["mean"],
                    pair_what="same input, sampler seeds 0 vs 1", seconds=one["seconds"])  # fmt: skip
            run.add(f"{name}, mean of 4", "emdiffuse", four["mean"], seconds=four["seconds"])
        calib[name] = calibration(four["mean"], four["std"], d.truth, d.eval_z)
        if uncertainty is None:
            uncertainty = four["std"]
    budgets = {kind: {k: v for k, v in m.items() if k != "path"} | {"path": Path(m["path"]).name}
               for kind, m in models.items()}  # fmt: skip
    return {"models": budgets, "calibration": calib, "uncertainty": uncertainty,
            "model_paths": {k: m["path"] for k, m in models.items()}}  # fmt: skip


def peers(run: LevelRun, sizes: Sizes, cache: Path, args) -> dict[str, Any]:
    """CAREamics N2V (denoise) and CARE (all tasks) trained on the same data and steps."""
    d = run.data
    k = d.level.factor
    info: dict[str, Any] = {}
    if args.no_peers:
        return {"skipped": "--no-peers"}
    for algorithm, arrays in peer_inputs(d).items():
        print(f"  CAREamics {algorithm}", flush=True)
        result = run_peer(algorithm, arrays, d, sizes, cache, args.peers_python, seed=args.seed,
                          threads=args.threads)  # fmt: skip
        if "error" in result:
            print(f"    failed: {result['error'][:300]}", flush=True)
            info[algorithm] = {"error": result["error"]}
            continue
        meta = result["meta"]
        print(f"    {meta['train_seconds']:.0f} s training, {meta['steps']} steps"
              f"{' (cached)' if meta.get('cached') else ''}", flush=True)  # fmt: skip
        info[algorithm] = {k2: v for k2, v in meta.items() if k2 != "config"}
        info[algorithm]["config"] = meta.get("config")
        preds = result["predictions"]
        label = {"n2v": "N2V (CAREamics)", "care": "CARE (CAREamics)"}[algorithm]
        seconds = float(meta["predict_seconds"].get("A", math.nan))
        if d.level.task == "isotropic":
            volume = interpolate_z(d.test_inputs[0], k, "cubic")
            volume[d.eval_z] = preds["A"]
            run.add(label, "learned", volume, seconds=seconds)
        elif d.level.task == "denoise":
            run.add(label, "learned", preds["A"], pair=preds["B"],
                    pair_what="noise realisations A vs B", seconds=seconds)  # fmt: skip
        else:
            run.add(label, "learned", preds["A"], seconds=seconds)
    return info


def evaluate_level(level: Level, sizes: Sizes, clean_train: np.ndarray, cache: Path, args):
    """Every method on one level: (JSON summary, images for the figures)."""
    start = time.perf_counter()
    data = make_task_data(level, sizes, clean_train)
    run = LevelRun(data)
    tuned, t = _timed(classical, run, sizes)
    run.timings["classical (tuning + apply)"] = t
    project = project_models(run, sizes, cache, args)
    peer_info = peers(run, sizes, cache, args)
    rows, t = _timed(run.rows)
    run.timings["scoring"] = t
    run.timings["level total"] = time.perf_counter() - start
    summary = {
        "task": level.task, "label": level.label, "level": level.__dict__,
        "rows": rows, "calibration": project["calibration"], "models": project["models"],
        "peers": peer_info, "classical_tuning": tuned, "timings": run.timings,
        "test_shape_truth": list(data.truth.shape), "test_input_shape": list(data.test_inputs[0].shape),
        "eval_slices": data.eval_z.tolist(), "input_voxel_nm": list(data.input_voxel),
    }  # fmt: skip
    view = "xz" if level.task == "isotropic" else "xy"
    images = {
        "key": level.key, "label": level.label, "view": view, "z": int(data.eval_z[len(data.eval_z) // 2]),
        "columns": [("truth", data.truth)] + [(_short(m["method"]), m["output"]) for m in run.methods],
        "uncertainty": project["uncertainty"], "model_paths": project["model_paths"],
    }  # fmt: skip
    return summary, images


def _short(method: str) -> str:
    """A column title for the crop panels."""
    for long, short in (("regression UNet", "regression UNet"), ("non-local means", "NLM"),
                        ("Gaussian filter", "Gaussian"), ("interpolation in z", "linear z"),
                        ("cubic spline in z", "cubic z")):  # fmt: skip
        if method.startswith(long) or long in method:
            return short
    return method.replace(" (CAREamics)", "").replace(", ", "\n")


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
    m_low, m_high = config.normalization["low"], config.normalization["high"]
    picks = np.linspace(0, len(files) - 1, REAL_EM_PATCHES).round().astype(int)
    mapped = m_low + (stack[picks] - low) / (high - low) * (m_high - m_low)
    work = cache / "work" / "real_em"
    work.mkdir(parents=True, exist_ok=True)
    source = write_input(mapped.astype(np.float32), work / "input.ome.zarr", (VOXEL_NM,) * 3)
    result = run_enhance(model, source, work / "enhanced.ome.zarr", samples=4, seed=seed)
    names = [files[i].name for i in picks]
    real_em_figure(stack[picks], result["mean"], result["std"], names, out / "real_em.png")
    return {"folder": str(folder), "patches": names, "n_patch_set": len(files),
            "percentiles_0.5_99.5": [float(low), float(high)],
            "model_normalization": [m_low, m_high], "samples": 4,
            "seconds": result["seconds"], "figure": "real_em.png",
            "mean_std_model_units": float(np.mean(result["std"]))}  # fmt: skip


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and budgets")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--cache", type=Path, default=None, help="models, CAREamics results, scratch")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--no-peers", action="store_true", help="skip CAREamics")
    p.add_argument("--no-aniso", action="store_true", help="skip vemdiffuse-a")
    p.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python")
    p.add_argument(
        "--real-em", type=Path, default=ROOT.parent / "shared" / "data" / "real_em_noisy"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="training and sampler seed")
    p.add_argument("--progress", action="store_true", help="training progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = provenance_record(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals in small trained nets slow CPU inference
    sizes = QUICK if args.quick else FULL
    cache = (args.cache or default_cache()).resolve()
    out = (args.out or (cache / "quick-results" if args.quick else RESULTS)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"quality benchmark ({'quick' if args.quick else 'full'}): results {out}, cache {cache}")
    clean_train = clean_block(TRAIN_ORIGIN, sizes.train_shape)
    levels: dict[str, Any] = {}
    images: dict[str, list] = {}
    for level in (lv for lv in LEVELS if lv.task in args.tasks):
        print(f"{level.key}: {level.label}", flush=True)
        summary, pics = evaluate_level(level, sizes, clean_train, cache, args)
        levels[level.key] = summary
        images.setdefault(level.task, []).append(pics)
    figures = {}
    curves = []
    for task, entries in images.items():
        figures[f"{task}_panel"] = panel(task, entries, out / f"{task}_panel.png").name
        bars = [
            (levels[k]["label"], levels[k]["rows"]) for k in levels if levels[k]["task"] == task
        ]
        figures[f"{task}_metrics"] = metric_bars(task, bars, out / f"{task}_metrics.png").name
    for key, lv in levels.items():
        for name, c in lv["calibration"].items():
            short = key.split("-", 1)[1] if lv["task"] != "denoise" else key.replace("denoise-", "")
            curves.append({"task": lv["task"], "label": f"{name} {short}", **c["reliability"]})
    if curves:
        figures["calibration"] = calibration_plot(curves, out / "calibration.png").name
    real = {"skipped": "no denoise level in this run"}
    if "denoise" in images:
        first = images["denoise"][0]
        real = real_em(args.real_em, first["model_paths"]["diffusion"], cache, out, args.seed)
        real["model"] = f"emdiffuse-n of level {first['key']} ({first['label']})"
    total = time.perf_counter() - start
    result = {
        "command": "python benchmarks/quality/run.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "mode": "quick" if args.quick else "full", "wall_seconds": total,
        "environment": environment(args.peers_python), "sizes": sizes.__dict__,
        "train_settings": train_settings(sizes), "enhance_defaults": enhance_defaults(),
        "seeds": {"world": WORLD_SEED, "train_noise": TRAIN_NOISE_SEED,
                  "test_noise": list(TEST_NOISE_SEEDS), "training": args.seed,
                  "sampler": [args.seed, args.seed + 1]},
        "origins": {"train": list(TRAIN_ORIGIN), "test": list(TEST_ORIGIN)},
        "voxel_nm": VOXEL_NM, "levels": levels, "real_em": real, "figures": figures,
        "provenance": record,
    }  # fmt: skip
    (out / "quality.json").write_text(json.dumps(result, indent=1, default=_json_default))
    write_markdown(result, out / "quality.md", reading=Path(__file__).with_name("READING.md"))
    print(f"done in {total / 60:.1f} min: {out / 'quality.md'}")
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
