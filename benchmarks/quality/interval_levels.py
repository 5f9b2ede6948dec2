"""Do a model's intervals at the other stored levels hold on held-out real EM? (issue 14,
part 4: ``enhance --interval-level``.)

A calibration fitted at the end of training stores the conformal scale at 50, 68, 80, 90, 95
and 99 % (:data:`emdiffuse.models.calibration.INTERVAL_LEVELS`). For a trained residual
model of a FlyEM level (a ``.safetensors`` from the quality harness's cache, trained on
``training_sample1``), this enhances the level's first held-out test input of
``training_sample2`` through ``emdiffuse.enhance`` at each stored level, for the mean alone
(``--samples 0``: the error head's intervals) and for the mean of N samples, and scores the
written half-widths as the quality report does: the share of scored voxels whose truth lies
within them (the target: within 3 points of each level), and their mean width.

    python benchmarks/quality/interval_levels.py --level isotropic-k4 \\
        --model CACHE/models/flyem-isotropic-k4-residual-1200s-*/model.safetensors \\
        [--samples 0 4] [--name interval_levels_isotropic-k4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import quality_project as qp
from quality_data import flyem_levels
from quality_scores import uncertainty_scores

from emdiffuse.models.calibration import levels
from emdiffuse.models.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import start_record  # noqa: E402

TOLERANCE = 0.03  # coverage within 3 points of the level: issue 14's bound at 90 %


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--level", required=True, help="a FlyEM level key, e.g. isotropic-k4")
    p.add_argument("--model", required=True, type=Path, help="a calibrated model's .safetensors")
    p.add_argument("--samples", type=int, nargs="+", default=[0, 4],
                   help="0: the mean alone (error head); N >= 2: the mean of N samples")  # fmt: skip
    p.add_argument("--cache", type=Path, default=Path("/tmp/qcache"), help="scratch folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    p.add_argument("--name", default=None, help="file name (default: interval_levels_LEVEL)")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"no model file at {args.model}: pass a trained model's .safetensors")
    calibration = load_checkpoint(args.model)[0].calibration
    if not calibration:
        p.error(f"{args.model} stores no calibration")
    stored = levels(calibration)
    if len(stored) < 2:
        p.error(f"{args.model}'s calibration holds one level only (a model trained before "
                "the other levels were stored): train a new one")  # fmt: skip
    if any(n == 1 or n < 0 for n in args.samples):
        p.error("--samples takes 0 (the mean alone) or N >= 2")
    record = start_record("benchmarks/quality/interval_levels.py", argv)
    source, found, sizes = flyem_levels([args.level])
    data = source.task_data(found[0], sizes, source.train_volume(sizes))
    work = args.cache / "work" / "interval_levels"
    work.mkdir(parents=True, exist_ok=True)
    inp = qp.write_input(data.test_inputs[0], work / f"in_{args.level}.ome.zarr", data.input_voxel)
    rows = []
    started = time.perf_counter()
    for samples in args.samples:
        for level in stored:
            run = qp.run_enhance(args.model, inp, work / "out.ome.zarr", samples=samples, seed=0,
                                 interval_level=level)  # fmt: skip
            if "error" in run:
                raise SystemExit(f"enhance --samples {samples} --interval-level {level}: "
                                 f"{run['error']}")  # fmt: skip
            if run["uncertainty"] is None:
                raise SystemExit(f"--samples {samples} wrote no uncertainty image")
            meaning = run["uncertainty_meaning"]
            u = uncertainty_scores(run["mean"], run["uncertainty"], data.truth, data.eval_z,
                                   meaning)  # fmt: skip
            width = float(np.mean(run["uncertainty"][data.eval_z]))
            rows.append({"samples": samples, "level": level,
                         "written_level": float(meaning.get("level", float("nan"))),
                         "coverage": round(u["coverage"], 4), "mean_half_width": round(width, 5),
                         "met": abs(u["coverage"] - level) <= TOLERANCE,
                         "enhance_s": round(run["seconds"], 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    what = {0: "mean (1 NFE), the error head's intervals"}
    lines = ["| output | level | coverage | within 3 points | mean half-width |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        name = what.get(row["samples"], f"mean of {row['samples']}, the samples' spread")
        lines.append(f"| {name} | {100 * row['level']:g} % | {100 * row['coverage']:.1f} % | "
                     f"{'✓' if row['met'] else '✗'} | {row['mean_half_width']:.4f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    name = args.name or f"interval_levels_{args.level}"
    result = {"level": args.level, "model": args.model.parent.name, "stored_levels": stored,
              "calibrated_level": calibration["level"], "rows": rows,
              "seconds": round(time.perf_counter() - started), "provenance": record}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(
        f"# Calibrated intervals at every stored level, FlyEM {args.level}\n\n"
        f"Model: `{args.model.parent.name}` (trained on `training_sample1`, calibrated at "
        f"{100 * calibration['level']:g} % on its held-out patches, scales stored at "
        f"{', '.join(f'{100 * lv:g}' for lv in stored)} %). Each row is one `emdiffuse.enhance` "
        f"run with `interval_level` on the first held-out test input of `training_sample2`, "
        f"scored on the report's voxels: coverage is the share whose truth lies within the "
        f"written half-width of the output (target: within 3 points of the level). Half-widths "
        f"in the output's units (grey value / 255). Command: `python "
        f"benchmarks/quality/interval_levels.py --level {args.level} --model <that model> "
        f"--samples {' '.join(map(str, args.samples))}`.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
