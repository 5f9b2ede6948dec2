"""The best linear filter of each FlyEM level: how far the residual kind's fitted skip gets alone.

For each level and skip width (1, 3, 5, 7, 9 voxels), the least-squares linear filter from
condition to target is fitted the way training fits the mean network's skip
(``emdiffuse.models.mean_net.least_squares_skip`` on 64 random 48² patches of
``training_sample1``, as read), applied to the test input of ``training_sample2`` with mirrored
edges (isotropic: the input slices mirrored at the volume's ends, as the pipeline does) and
scored like every other row of the quality benchmark. Isotropic levels also with one slice of
z context on each side (four input slices). No training, no network: a lower bound for the
mean network and a classical peer (a Wiener filter learned from the data).

    python benchmarks/quality/linear_filter.py [--levels denoise-dose8 isotropic-k4 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from quality_data import blur_downsample_xy, flyem_levels
from quality_scores import score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import start_record  # noqa: E402

from emdiffuse.models.conditioning import upsample_xy  # noqa: E402
from emdiffuse.models.mean_net import least_squares_skip  # noqa: E402
from emdiffuse.models.presets import make_config  # noqa: E402

SIZES = (1, 3, 5, 7, 9)
PATCHES, PATCH = 64, 48  # as training fits the skip (build.SKIP_FIT_PATCHES, the harness's patch)


def isotropic_inputs(volume: np.ndarray, k: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cond (n, 2 + 2c, Y, X), target (n, k - 1, Y, X))`` of every interval of ``volume``
    (its every k-th slice the input), the input slices mirrored at the ends."""
    slices = volume[::k]
    padded = np.pad(slices, ((context, context), (0, 0), (0, 0)), mode="reflect")
    n = len(slices) - 1
    cond = np.stack([padded[i : i + 2 + 2 * context] for i in range(n)])
    target = np.stack([volume[i * k + 1 : i * k + k] for i in range(n)])
    return cond, target


def random_patches(cond: np.ndarray, target: np.ndarray, rng) -> tuple[torch.Tensor, torch.Tensor]:
    picks = rng.integers(0, len(cond), PATCHES)
    ys = rng.integers(0, cond.shape[2] - PATCH + 1, PATCHES)
    xs = rng.integers(0, cond.shape[3] - PATCH + 1, PATCHES)
    box = [
        (i, slice(y, y + PATCH), slice(x, x + PATCH)) for i, y, x in zip(picks, ys, xs, strict=True)
    ]
    c = np.stack([cond[i, :, ys_, xs_] for i, ys_, xs_ in box])
    t = np.stack([target[i, :, ys_, xs_] for i, ys_, xs_ in box])
    return torch.from_numpy(c).double(), torch.from_numpy(t).double()


def apply(cond: np.ndarray, weights, bias, size: int) -> np.ndarray:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], size, size)
    x = torch.from_numpy(cond).double()
    r = size // 2
    if r:
        x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    out = torch.nn.functional.conv2d(x, w) + torch.tensor(bias, dtype=torch.float64)[:, None, None]
    return out.numpy()


def level_rows(level, data, rng) -> list[dict]:
    rows = []
    if level.task == "isotropic":
        k = level.factor
        for context in (0, 1):
            train_c, train_t = isotropic_inputs(data.train["clean"], k, context)
            test_c, _ = isotropic_inputs(data.truth, k, context)
            for size in SIZES:
                w, b = least_squares_skip(*random_patches(train_c, train_t, rng), size)
                pred = apply(test_c, w, b, size)  # (intervals, k - 1, Y, X)
                out = data.truth.copy()
                for i, block in enumerate(pred):
                    out[i * k + 1 : i * k + k] = block
                s = score(out, data.truth, data.eval_z, data.voxel_nm)
                rows.append({"level": level.key, "z_context": context, "size": size,
                             "psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4)})  # fmt: skip
        return rows
    if level.task == "denoise":
        train_c, train_t = data.train["noisy"][:, None], data.train["clean"][:, None]
        test_c = data.test_inputs[0][:, None]
    else:  # super-resolve: the input upsampled as the model's condition is
        mode = make_config("emdiffuse-r", "tiny", scale_factor=level.factor).cond_upsample
        k = level.factor

        def up(low):
            t = torch.from_numpy(np.ascontiguousarray(low[:, None], dtype=np.float32))
            return upsample_xy(t, k, mode).double().numpy()

        train_t = data.train["clean"][:, None]
        train_c = up(blur_downsample_xy(data.train["clean"], k))
        test_c = up(data.test_inputs[0])
    for size in SIZES:
        w, b = least_squares_skip(*random_patches(train_c, train_t, rng), size)
        out = apply(test_c, w, b, size)[:, 0]
        s = score(out, data.truth, data.eval_z, data.voxel_nm)
        rows.append({"level": level.key, "z_context": 0, "size": size,
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
    lines = ["| level | z context | " + " | ".join(f"{s}×{s}" for s in SIZES) + " |",
             "|---|---|" + "---|" * len(SIZES)]  # fmt: skip
    for key in dict.fromkeys(r["level"] for r in rows):
        for context in (0, 1):
            mine = [r for r in rows if r["level"] == key and r["z_context"] == context]
            if mine:
                cells = " | ".join(f"{r['psnr']:.2f} / {r['ssim']:.3f}" for r in mine)
                lines.append(f"| {key} | {context} | {cells} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear_filter.json").write_text(
        json.dumps(
            {"rows": rows, "provenance": record, "patches": PATCHES, "patch": PATCH}, indent=1
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
