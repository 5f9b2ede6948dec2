"""Test-time symmetry averaging of the posterior mean: what the 8 rotations and flips of the
image plane add on a FlyEM level.

A trained residual model (the quality harness's cache, ``--model``) enhances the level's
test input ``--samples 0`` (one network evaluation per voxel) under each of the 8 symmetries
of the yx plane (the input turned by k × 90° and optionally mirrored, the output turned
back); the running average of the first 1, 2, 4 and 8 is scored against the truth like every
quality row. Training draws the same symmetries as augmentation, so this measures how much
of the mean's error is not symmetric — what averaging 8 network evaluations could remove.

    python benchmarks/quality/symmetry_average.py --level denoise-dose2 \\
        --model CACHE/models/flyem-denoise-dose2-residual-150s-*/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import quality_project as qp
from quality_data import flyem_levels
from quality_scores import score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import start_record  # noqa: E402

SYMMETRIES = [(turns, mirror) for turns in range(4) for mirror in (False, True)]


def transformed(volume: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """``volume`` (z, y, x) turned by ``turns`` × 90° in yx, then mirrored in x."""
    out = np.rot90(volume, turns, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if mirror else out)


def restored(volume: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """The inverse of :func:`transformed`."""
    out = volume[..., ::-1] if mirror else volume
    return np.ascontiguousarray(np.rot90(out, -turns, axes=(-2, -1)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--level", required=True, help="a FlyEM level key, e.g. denoise-dose2")
    p.add_argument("--model", required=True, type=Path, help="a residual model's .safetensors")
    p.add_argument("--work", type=Path, default=Path("/tmp/emdiffuse-symmetry"))
    p.add_argument("--name", default="symmetry_average")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"no model file at {args.model}: pass a trained model's .safetensors")
    record = start_record("benchmarks/quality/symmetry_average.py", argv)
    source, levels, sizes = flyem_levels([args.level])
    data = source.task_data(levels[0], sizes, source.train_volume(sizes))
    args.work.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(data.test_inputs[0], np.float32)
    means, rows = [], []
    for i, (turns, mirror) in enumerate(SYMMETRIES, start=1):
        inp = qp.write_input(transformed(volume, turns, mirror), args.work / "in.ome.zarr",
                             data.input_voxel)  # fmt: skip
        run = qp.run_enhance(args.model, inp, args.work / "out.ome.zarr", samples=0, seed=0)
        if "error" in run:
            raise SystemExit(f"enhance failed: {run['error']}")
        means.append(restored(run["mean"], turns, mirror))
        one = score(means[-1], data.truth, data.eval_z, data.voxel_nm)
        row = {"symmetry": f"{90 * turns}°{' mirrored' if mirror else ''}",
               "psnr": round(one["psnr"], 3), "ssim": round(one["ssim"], 4)}  # fmt: skip
        if i in (2, 4, 8):
            avg = score(np.mean(means, axis=0), data.truth, data.eval_z, data.voxel_nm)
            row["average"] = {"of": i, "psnr": round(avg["psnr"], 3),
                              "ssim": round(avg["ssim"], 4),
                              "bias_pct": round(avg["bias_pct"], 3)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    lines = ["| symmetry | its mean alone | average of the first n (n) | Δ to 0° |",
             "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        avg = row.get("average")
        cell = f"{avg['psnr']:.3f} / {avg['ssim']:.4f} ({avg['of']})" if avg else ""
        delta = (f"{avg['psnr'] - base['psnr']:+.3f} dB / {avg['ssim'] - base['ssim']:+.4f}"
                 if avg else "")  # fmt: skip
        lines.append(f"| {row['symmetry']} | {row['psnr']:.3f} / {row['ssim']:.4f} | {cell} | {delta} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"level": args.level, "model": str(args.model), "rows": rows, "provenance": record}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(
        f"# Symmetry averaging of the posterior mean, FlyEM {args.level} (PSNR dB / SSIM)\n\n"
        f"Model: `{args.model.parent.name}`. Command: `python benchmarks/quality/"
        f"symmetry_average.py --level {args.level} --model <that model>`.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
