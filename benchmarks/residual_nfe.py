"""How few network evaluations a mean-plus-residual sample needs (issue 14's stretch target).

    python benchmarks/residual_nfe.py [--levels denoise-dose2 super-resolve-k4]
        [--samplers ddim dpmpp_2m dpmpp_2m_sde ddpm] [--steps 1 2 4 8] [--reference 1000]
        [--slices 4] [--budget 150] [--cache DIR] [--model DIR] [--quick]
        [--start-noise 1.5 2 3] [--start-samplers dpmpp_2m dpmpp_2m_sde] [--start-steps 4]

For each FlyEM level, the quality benchmark's residual model (trained on ``training_sample1``
for ``--budget`` seconds through the shipping trainer, or reused from the quality benchmark's
cache, same key) enhances the first ``--slices`` slices of the held-out ``training_sample2``
test input through ``emdiffuse.enhance``: one sample (``--samples 1``, seed 0) with every
sampler at every step count, and the reference — ancestral ``ddpm`` at ``--reference``
steps, the reference's 1000-step loop — plus the one-evaluation posterior mean
(``--samples 0``). Scores per quadrant of each slice: PSNR, SSIM, high-frequency spectrum
error and FRC 1/7 resolution against the truth (the quality benchmark's :func:`score`); Δ
is the paired per-quadrant difference against the reference with its standard error.

Truncated starts (``enhance(start_noise=σ)``, karras spacing): each ``--start-samplers``
sampler at each ``--start-steps`` count, starting at every ``--start-noise`` σ instead of pure
noise — the mean's coarse structure, the model's texture.

Fitted schedules (``enhance(spacing="fitted")``): ``dpmpp_2m`` over each schedule the model
fitted at the end of training (``train --fit-steps``, :mod:`emdiffuse.models.step_fit`).

The stretch target (issue 14): a sampler at ≤ 4 NFE whose single sample is within 0.3 dB of
the reference's PSNR (the 90 % interval of the paired difference inside ±0.3 dB) and whose
spectrum error is at most 1.1× the reference's.

Writes ``results/residual_nfe.{json,md}`` (``--name``; ``_quick`` with ``--quick``) after
each level. The reference sample is kept in the cache beside the level's work (keyed by the
model's cache folder, the steps and the slices), so a rerun on the same model reuses it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from common import publish, start_record

sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))
from quality_data import flyem_levels  # noqa: E402
from quality_plan import QUICK_SCALE, Entry  # noqa: E402
from quality_project import level_work_dir, run_enhance, train_model, write_input  # noqa: E402
from quality_scores import score  # noqa: E402
from run import PROBE_SECONDS, default_cache, train_extra  # noqa: E402

from emdiffuse.models.checkpoints import load_checkpoint  # noqa: E402
from emdiffuse.models.sampler_names import network_evaluations, resolve_spacing  # noqa: E402
from emdiffuse.training import trainer  # noqa: E402

PSNR_TOL_DB = 0.3
SPECTRUM_TOL = 1.10
Z90 = 1.645  # the 90 % interval of the paired difference (two one-sided tests at 5 %)
MAX_NFE = 4
REFERENCE_SAMPLER = "ddpm"
QUALITY_SAMPLES = 4  # the quality benchmark's default N (its models calibrate at this N)


def per_quadrant(output: np.ndarray, truth: np.ndarray, eval_z: np.ndarray,
                 voxel_nm: float) -> dict:  # fmt: skip
    """The quality benchmark's scores of each quadrant (2 × 2 per scored slice), the units the
    paired differences are taken over: ``{metric: [value per quadrant]}``."""
    half_y, half_x = truth.shape[1] // 2, truth.shape[2] // 2
    rows = []
    for z in eval_z:
        for ys in (slice(0, half_y), slice(half_y, 2 * half_y)):
            for xs in (slice(0, half_x), slice(half_x, 2 * half_x)):
                rows.append(score(output[z : z + 1, ys, xs], truth[z : z + 1, ys, xs],
                                  np.array([0]), voxel_nm))  # fmt: skip
    keys = ("psnr", "ssim", "spectrum_error", "frc_truth_nm", "bias_pct")
    return {k: [float(r[k]) for r in rows] for k in keys}


def paired(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean of the paired differences and its standard error."""
    d = np.asarray(values) - np.asarray(reference)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se


def verdict(row: dict, ref: dict) -> str:
    """``pass`` / ``fail`` against the stretch target for samples at ≤ MAX_NFE, else ''
    (the posterior mean is no sample: it has no texture to keep)."""
    if row["nfe"] > MAX_NFE or row is ref or row["samples"] == 0:
        return ""
    d, se = row["d_psnr"], row["d_psnr_se"]
    close = abs(d) + Z90 * (se if math.isfinite(se) else 0.0) <= PSNR_TOL_DB
    sharp = row["spectrum_error"] <= SPECTRUM_TOL * ref["spectrum_error"]
    return "pass" if close and sharp else "fail"


def run_level(source, level, sizes, clean_train, args, cache: Path, scale: float) -> dict:
    data = source.task_data(level, sizes, clean_train)
    entry = Entry(method="residual", budget=float(args.budget))
    mode = "quick" if args.quick else "full"
    # the quality benchmark's settings exactly, so that its cached model is reused
    extra = train_extra(argparse.Namespace(samples=QUALITY_SAMPLES, train_set=None), mode)
    if args.model is not None:  # a model an earlier run trained for this level
        meta = json.loads((args.model / "meta.json").read_text())
        model = {**meta, "path": str(args.model / trainer.FINAL_NAME), "cached": True}
    else:
        model = train_model(entry, data, sizes, cache, budget=entry.budget * scale,
                            probe_seconds=PROBE_SECONDS[mode], source="flyem", seed=0,
                            extra=extra)  # fmt: skip
    work = level_work_dir(cache, "flyem-nfe", level)
    # the first ``--slices`` test slices (2D tasks: each slice is enhanced on its own)
    test, truth = data.test_inputs[0][: args.slices], data.truth[: args.slices]
    eval_z = data.eval_z[data.eval_z < args.slices]
    inp = write_input(test, work / f"input-{args.slices}.ome.zarr", data.input_voxel)
    runs = [("mean (samples 0)", None, 1, 0, {})]
    # each sampler on its own default spacing (a model's fitted schedule has its own rows)
    runs += [(name, name, steps, 1, {"spacing": resolve_spacing(name)})
             for name in args.samplers for steps in args.steps]  # fmt: skip
    runs += [(f"{name} karras from σ {sigma:g}", name, steps, 1,
              {"spacing": "karras", "start_noise": sigma})
             for name in args.start_samplers for steps in args.start_steps
             for sigma in args.start_noise]  # fmt: skip
    # the schedules the model fitted at the end of training (train --fit-steps)
    fitted = load_checkpoint(model["path"])[0].step_schedules
    if fitted is not None:
        runs += [(f"{fitted['sampler']} fitted", fitted["sampler"], int(steps), 1,
                  {"spacing": "fitted"}) for steps in sorted(fitted["schedules"], key=int)]  # fmt: skip
    runs.append(("reference", REFERENCE_SAMPLER, args.reference, 1, {}))
    rows = []
    for label, sampler, steps, samples, options in runs:
        t0 = time.perf_counter()
        kept = work / f"{Path(model['path']).parent.name}-{label}-{steps}-{args.slices}.npz"
        if label == "reference" and kept.exists():  # its 1000 steps, from an earlier run
            saved = np.load(kept)
            out, t0 = {"mean": saved["mean"]}, t0 - float(saved["seconds"])
        else:
            out = run_enhance(model["path"], inp, work / "out.ome.zarr", samples=samples,
                              seed=0, steps=steps, sampler=sampler, **options)  # fmt: skip
        if "error" in out:
            raise SystemExit(f"{level.key} {label}@{steps}: {out['error']}")
        if label == "reference" and not kept.exists():
            np.savez(kept, mean=out["mean"], seconds=time.perf_counter() - t0)
        scores = per_quadrant(out["mean"], truth, eval_z, data.voxel_nm)
        nfe = 1 if samples == 0 else network_evaluations(sampler, steps)
        row = {"label": label, "sampler": sampler or "mean", "steps": steps, "nfe": nfe,
               "samples": samples, "seconds": time.perf_counter() - t0, **options,
               "per_quadrant": scores}  # fmt: skip
        row.update({k: float(np.mean(v)) for k, v in scores.items()})
        rows.append(row)
        print(f"  {level.key} {label:18s} {steps:5d} steps: {row['psnr']:.2f} dB, SSIM "
              f"{row['ssim']:.3f}, spectrum {row['spectrum_error']:.3f}, "
              f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
    ref = rows[-1]
    for row in rows:
        for key in ("psnr", "spectrum_error"):
            row[f"d_{key}"], row[f"d_{key}_se"] = paired(row["per_quadrant"][key],
                                                         ref["per_quadrant"][key])  # fmt: skip
        row["goal"] = "reference" if row is ref else verdict(row, ref)
    return {"level": level.key, "model": model, "slices": int(len(eval_z)), "rows": rows}


def report(result: dict) -> str:
    lines = [
        "# How few evaluations a mean-plus-residual sample needs (issue 14 stretch target)", "",
        f"FlyEM; the quality benchmark's residual model ({result['budget']:g} s on 2 CPU cores, "
        "trained on `training_sample1`), one sample of the held-out `training_sample2` input "
        "through `emdiffuse.enhance` (seed 0). Reference: ancestral `ddpm` at "
        f"{result['reference']} steps. Δ: paired per-quadrant difference (2 × 2 per slice) "
        "against the reference "
        "± its standard error. Spectrum err: mean |log10 power ratio| over the upper half of "
        "frequencies (↓). Goal (≤ 4 NFE): |ΔPSNR| + 1.645 s.e. ≤ 0.3 dB and spectrum error "
        "≤ 1.1× the reference's.", "",
    ]  # fmt: skip
    for lv in result["levels"]:
        m = lv["model"]
        lines += [f"## {lv['level']} ({lv['slices']} scored slices, {4 * lv['slices']} "
                  f"quadrants; model: {m.get('steps')} "
                  f"steps in {m.get('seconds', math.nan):.0f} s)", "",
                  "| output | steps | NFE | PSNR dB | ΔPSNR dB | SSIM | spectrum err | "
                  "Δspectrum | FRC nm | s | goal |", "|" + "---|" * 11]  # fmt: skip
        for r in lv["rows"]:
            lines.append(
                f"| {r['sampler'] if r['label'] == r['sampler'] else r['label']}"
                f" | {r['steps']} | {r['nfe']} | {r['psnr']:.2f} | "
                f"{r['d_psnr']:+.2f} ± {r['d_psnr_se']:.2f} | {r['ssim']:.3f} | "
                f"{r['spectrum_error']:.3f} | {r['d_spectrum_error']:+.3f} ± "
                f"{r['d_spectrum_error_se']:.3f} | {r['frc_truth_nm']:.1f} | {r['seconds']:.0f} | "
                f"{r['goal']} |"
            )
        lines.append("")
    lines += [f"Command: `{result['provenance']['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", nargs="+", default=["denoise-dose2", "super-resolve-k4"])
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m", "dpmpp_2m_sde", "ddpm"])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--reference", type=int, default=1000, help="steps of the reference ddpm")
    p.add_argument("--start-noise", nargs="*", type=float, default=[1.5, 2.0, 3.0],
                   help="σ of the truncated-start rows (none: no such rows)")
    p.add_argument("--start-samplers", nargs="+", default=["dpmpp_2m", "dpmpp_2m_sde"])
    p.add_argument("--start-steps", nargs="+", type=int, default=[4])
    p.add_argument("--slices", type=int, default=3,
                   help="enhance and score the first N test slices (a 1000-step sample of one "
                        "240² slice takes about 5 min on 2 CPU cores)")  # fmt: skip
    p.add_argument("--budget", type=float, default=150.0, help="training seconds (plan budget)")
    p.add_argument("--cache", type=Path, default=None, help="the quality benchmark's cache")
    p.add_argument("--model", type=Path, default=None,
                   help="score this model folder of an earlier run's cache (models/NAME: "
                        "model.safetensors and meta.json) instead of training; one level")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small volumes and budgets (smoke run)")
    p.add_argument("--name", default="residual_nfe", help="results/NAME.{json,md}")
    args = p.parse_args(argv)
    record = start_record(__file__, argv)
    try:
        source, levels, sizes = flyem_levels(args.levels, args.quick)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    scale = QUICK_SCALE if args.quick else 1.0
    if args.quick:
        args.reference = min(args.reference, 50)
    if args.slices < 2:
        print("--slices must be at least 2 (the paired differences need a spread)", file=sys.stderr)
        return 2
    if args.model is not None and (len(levels) != 1 or not (args.model / "meta.json").exists()):
        print("--model needs one --levels and a model folder holding meta.json", file=sys.stderr)
        return 2
    isotropic = [lv.key for lv in levels if lv.task == "isotropic"]
    if isotropic:
        print(f"{isotropic}: only the 2D tasks (denoise, super-resolve) are offered here",
              file=sys.stderr)  # fmt: skip
        return 2
    cache = args.cache or default_cache()
    clean_train = source.train_volume(sizes)
    result = {"budget": args.budget, "reference": args.reference, "levels": [],
              "provenance": record}  # fmt: skip
    name = args.name + ("_quick" if args.quick else "")
    for level in levels:  # published after each level: a long run keeps what it finished
        print(f"{level.key}:", flush=True)
        result["levels"].append(run_level(source, level, sizes, clean_train, args, cache, scale))
        publish(name, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
