"""What neighbouring slices are worth to a FlyEM denoiser: the least-squares linear filter
reading the noisy slice alone, and with 1 or 2 noisy slices above and below.

FlyEM's volumes are 10 nm isotropic, so adjacent slices show nearly the same structure under
independent shot noise. The quality benchmark's default denoisers (ours, CARE, Noise2Void)
read one slice; its ``-z1``/``-z2`` methods read 3 or 5 (``quality_plan``). The filter is fitted the way the report's linear-filter row is (``quality_linear``:
64 random 48² patches of the noisy ``training_sample1``, its slices mirrored at the ends)
and scored on the first test input's slices of ``training_sample2``, each with its real noisy
neighbours (the noise is keyed on global coordinates, so the middle slice is the test input
itself). No network: a lower bound on what a denoiser with z context can reach.

    python benchmarks/quality/denoise_z_context.py [--levels denoise-dose8 denoise-dose2]
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

CONTEXTS = (0, 1, 2)  # noisy slices read on each side of the denoised one
SIZES = (7, 9)  # filter widths in yx (voxels)


def level_rows(key: str) -> list[dict]:
    """PSNR / SSIM of the filter of every z context and width on one denoising level."""
    source, levels, sizes = flyem_levels([key])
    level = levels[0]
    data = source.task_data(level, sizes, source.train_volume(sizes))
    rows = []
    for context in CONTEXTS:
        cond_test = source.noisy_neighbours(level, sizes, context)
        if not np.array_equal(cond_test[:, context], data.test_inputs[0]):
            raise SystemExit("the neighbours' middle slice is not the test input: noise keying changed")
        cond_train = ql.slice_stacks(data.train["noisy"], context)
        rng = np.random.default_rng(0)
        for size in SIZES:
            w, b = ql.fit(cond_train, data.train["clean"][:, None], size, rng)
            out = ql.apply(cond_test, w, b, size)[:, 0].astype(np.float32)
            s = score(out, data.truth, data.eval_z, data.voxel_nm)
            rows.append({"level": key, "z_context": context, "slices": 1 + 2 * context,
                         "size": size, "psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", nargs="+", default=["denoise-dose8", "denoise-dose2"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    args = p.parse_args(argv)
    if any(not key.startswith("denoise-") for key in args.levels):
        p.error("--levels: denoising levels only (denoise-dose8, denoise-dose2)")
    record = start_record("benchmarks/quality/denoise_z_context.py", argv)
    rows = [row for key in args.levels for row in level_rows(key)]
    table = ql.filter_table(rows, "slices read", lambda context: str(1 + 2 * context))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "denoise_z_context.json").write_text(
        json.dumps({"rows": rows, "provenance": record, "patches": ql.PATCHES,
                    "patch": ql.PATCH}, indent=1) + "\n"  # fmt: skip
    )
    (args.out / "denoise_z_context.md").write_text(
        "# A linear denoising filter reading neighbouring slices, FlyEM (PSNR dB / SSIM)\n\n"
        "The least-squares filter from 1, 3 or 5 noisy slices to the clean middle one, fitted "
        "on 64 random 48² patches of `training_sample1` and scored on the held-out "
        "`training_sample2` like every quality row. The 1-slice row is the report's linear-filter "
        "peer; the networks reading neighbouring slices are in `z_context_denoise/`. Command: `python "
        "benchmarks/quality/denoise_z_context.py`.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
