"""Does the residual model's posterior mean follow the brightness of new data (issue 14)?

    python benchmarks/bias_shift.py --source synthetic --levels denoise-dose8 denoise-dose2
        [--budget 150] [--cache DIR] [--train-set KEY=VALUE ...] [--name NAME] [--quick]

The quality benchmark's residual model of each denoising level (trained for ``--budget``
seconds through the shipping trainer, or reused from the quality benchmark's cache, same
key) gives its one-evaluation posterior mean (``emdiffuse.enhance --samples 0``) of two
inputs of the same shape: the held-out test input (noise realisation A), and a crop of its
own noisy training volume. For each: the truth's mean and range, and the bias (mean of
estimate − truth, % of the truth's range) of the noisy input and of the posterior mean; and
the trained mean network's 1×1 skip from input to output in raw units (how much of the input
it passes straight through).

A mean that shrinks towards the training data's brightness is unbiased on its training crop
but off on a region of another brightness: ``kept`` is the share of the brightness
difference between the two regions that the estimate carries through
(1 − Δbias / Δtruth mean; 1: all of it; not defined below a 1 % difference).

Writes ``results/bias_shift_SOURCE.{json,md}`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import publish, start_record
from mean_init import raw_skip

sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))
from quality_data import select_levels  # noqa: E402
from quality_plan import QUICK_SCALE, Entry  # noqa: E402
from quality_project import level_work_dir, run_enhance, train_model, write_input  # noqa: E402
from quality_scores import truth_range  # noqa: E402
from run import PROBE_SECONDS, default_cache, key_value, train_extra  # noqa: E402

QUALITY_SAMPLES = 4  # the quality benchmark's N (its calibration, so its cache key)
MIN_SHIFT_PCT = 1.0  # below this brightness difference (% of range) "kept" is not defined


def bias_pct(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean of ``estimate - truth`` as a percentage of the truth's range."""
    return 100.0 * float(np.mean(estimate.astype(np.float64) - truth)) / truth_range(truth)


def run_level(source, level, sizes, clean_train, args, cache: Path, scale: float) -> dict:
    data = source.task_data(level, sizes, clean_train)
    entry = Entry(method="residual", budget=float(args.budget))
    mode = "quick" if args.quick else "full"
    extra = train_extra(argparse.Namespace(samples=QUALITY_SAMPLES, train_set=args.train_set),
                        mode)  # fmt: skip
    model = train_model(entry, data, sizes, cache, budget=entry.budget * scale,
                        probe_seconds=PROBE_SECONDS[mode], source=source.name, seed=0,
                        extra=extra)  # fmt: skip
    work = level_work_dir(cache, f"{source.name}-bias-shift", level)
    test = data.test_inputs[0]
    n, h, w = test.shape
    regions = {
        "held-out test": (test, data.truth),
        "training crop": (data.train["noisy"][:n, :h, :w], data.train["clean"][:n, :h, :w]),
    }
    rows = []
    for name, (noisy, truth) in regions.items():
        inp = write_input(noisy, work / f"{name.split()[0]}.ome.zarr", data.input_voxel)
        result = run_enhance(model["path"], inp, work / f"{name.split()[0]}_mean.ome.zarr",
                             samples=0, seed=0)  # fmt: skip
        if "error" in result:
            raise SystemExit(f"{level.key}: enhance failed: {result['error']}")
        rows.append({"region": name, "truth_mean": float(truth.mean()),
                     "truth_range": truth_range(truth), "input_bias_pct": bias_pct(noisy, truth),
                     "mean_bias_pct": bias_pct(np.asarray(result["mean"]), truth)})  # fmt: skip
    test_row, train_row = rows
    shift = 100.0 * (test_row["truth_mean"] - train_row["truth_mean"]) / test_row["truth_range"]
    lost = test_row["mean_bias_pct"] - train_row["mean_bias_pct"]
    kept = 1.0 + lost / shift if abs(shift) >= MIN_SHIFT_PCT else None
    print(f"{level.key}: brightness shift {shift:+.2f} %, bias {train_row['mean_bias_pct']:+.2f} "
          f"(training crop) -> {test_row['mean_bias_pct']:+.2f} % (test), kept {kept}",
          flush=True)  # fmt: skip
    return {"level": level.key, "model": {k: model.get(k) for k in ("steps", "seconds", "cached")},
            "rows": rows, "shift_pct": shift, "kept": kept,
            "skip_raw": raw_skip(Path(model["path"]))}  # fmt: skip


def report(result: dict) -> str:
    lines = [
        "# Does the residual mean follow the brightness of new data? (issue 14)", "",
        f"Source `{result['source']}`; the quality benchmark's residual model of each level "
        f"({result['budget']:g} s on 2 CPU cores). Posterior mean (`enhance --samples 0`) of "
        "the held-out test input and of a crop of the model's own noisy training volume, same "
        "shape. Bias: mean(estimate − truth) in % of the truth's range. Kept: the share of the "
        "two regions' brightness difference the estimate carries through (1 − Δbias / Δmean).",
        "", "| level | region | truth mean | truth range | noisy input bias % | posterior mean "
        "bias % |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for lv in result["levels"]:
        for r in lv["rows"]:
            lines.append(f"| {lv['level']} | {r['region']} | {r['truth_mean']:.3f} | "
                         f"{r['truth_range']:.3f} | {r['input_bias_pct']:+.2f} | "
                         f"{r['mean_bias_pct']:+.2f} |")  # fmt: skip
    lines += ["", "| level | brightness shift test − training, % of range | kept | model steps | "
              "mean network's skip (output per input voxel, raw units) |", "|---|---|---|---|---|"]  # fmt: skip
    for lv in result["levels"]:
        kept = "—" if lv["kept"] is None else f"{lv['kept']:.2f}"
        lines.append(f"| {lv['level']} | {lv['shift_pct']:+.2f} | {kept} | "
                     f"{lv['model'].get('steps')} | {lv['skip_raw']} |")  # fmt: skip
    lines += ["", f"Command: `{result['provenance']['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("synthetic", "flyem"), default="synthetic")
    p.add_argument("--levels", nargs="+", default=["denoise-dose8", "denoise-dose2"])
    p.add_argument("--budget", type=float, default=150.0, help="training seconds (plan budget)")
    p.add_argument("--cache", type=Path, default=None, help="the quality benchmark's cache")
    p.add_argument("--train-set", nargs="+", type=key_value, default=None,
                   metavar="KEY=VALUE", help="as the quality benchmark's (same models)")
    p.add_argument("--name", default=None, help="results name (default bias_shift_SOURCE)")
    p.add_argument("--quick", action="store_true", help="small volumes and budgets (smoke run)")
    args = p.parse_args(argv)
    record = start_record(__file__, argv)
    try:
        source, levels, sizes = select_levels(args.source, args.levels, args.quick, "denoise")
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    scale = QUICK_SCALE if args.quick else 1.0
    clean_train = source.train_volume(sizes)
    result = {"source": args.source, "budget": args.budget, "levels": [], "provenance": record}
    for level in levels:
        result["levels"].append(run_level(source, level, sizes, clean_train, args,
                                          args.cache or default_cache(), scale))  # fmt: skip
    name = (args.name or f"bias_shift_{args.source}") + ("_quick" if args.quick else "")
    publish(name, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
