"""The best linear filter of each FlyEM level: how far the residual kind's fitted skip gets alone.

For each level and skip width (1, 3, 5, 7, 9 voxels), the least-squares linear filter from
condition to target is fitted the way training fits the mean network's skip
(``quality_linear``: 64 random 48² patches of ``training_sample1``, as read), applied to
the test input of ``training_sample2`` with mirrored edges (isotropic: the input slices
mirrored at the volume's ends, as the pipeline does) and scored like every other row of the
quality benchmark. Isotropic levels also with one slice of z context on each side (four input
slices). No training, no network: a lower bound for the
mean network and a classical peer (a Wiener filter learned from the data).

    python benchmarks/quality/linear_filter.py [--levels denoise-dose8 isotropic-k4 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import quality_linear as ql
from quality_data import flyem_levels
from quality_scores import score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import start_record  # noqa: E402

SIZES = (1, 3, 5, 7, 9)


def level_rows(level, data, rng) -> list[dict]:
    """PSNR/SSIM of the filter of every width (isotropic: also with z context 1)."""
    rows = []
    for context in (0, 1) if level.task == "isotropic" else (0,):
        for size in SIZES:
            out = ql.restore(data, size, rng, context)[0]
            s = score(out, data.truth, data.eval_z, data.voxel_nm)
            rows.append({"level": level.key, "z_context": context, "size": size,
                         "psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", nargs="+", default=["denoise-dose8", "denoise-dose2",
                                                   "super-resolve-k4", "isotropic-k4",
                                                   "isotropic-k8"])  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    args = p.parse_args(argv)
    record = start_record("benchmarks/quality/linear_filter.py", argv)
    source, levels, sizes = flyem_levels(args.levels)
    clean = source.train_volume(sizes)
    rng = np.random.default_rng(0)
    rows = []
    for level in levels:
        data = source.task_data(level, sizes, clean)
        rows += level_rows(level, data, rng)
    table = ql.filter_table(rows, "z context", str)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear_filter.json").write_text(
        json.dumps(
            {"rows": rows, "provenance": record, "patches": ql.PATCHES, "patch": ql.PATCH}, indent=1
        )
        + "\n"  # fmt: skip
    )
    (args.out / "linear_filter.md").write_text(
        "# The least-squares linear filter of each FlyEM level (PSNR dB / SSIM)\n\n"
        "Fitted on 64 random 48² patches of `training_sample1` as training fits the mean "
        "network's skip, scored on `training_sample2` like every quality row. Command: "
        "`python benchmarks/quality/linear_filter.py`.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
