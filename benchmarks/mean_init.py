"""Where the residual kind's mean network starts, at an equal number of steps (issue 14).

    python benchmarks/mean_init.py [--levels denoise-dose2 isotropic-k4] [--steps 500]
        [--inits input least-squares] [--name mean_init_steps] [--quick]

For each FlyEM level and each ``mean_init`` the same residual model (the quality benchmark's
recipe: the demo's tiny CPU settings at its patch and region) trains on
``training_sample1`` for exactly ``--steps`` steps, with no time limit, so both starts get the
same optimisation. Each is scored on ``training_sample2`` through ``emdiffuse.enhance
--samples 0`` (the posterior mean, one evaluation), with the quality benchmark's scores:
PSNR, SSIM and bias. Also reported: the PSNR of the start itself (the skip alone, step 0),
and the mean network's skip weights at the start and the end, in raw units (input →
output). The wall-clock comparison at equal budget is in ``results/mean_init.md``.

Writes ``results/<name>.json`` (with provenance) and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import publish, start_record

sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))
from quality_data import flyem_levels  # noqa: E402
from quality_plan import Entry  # noqa: E402
from quality_project import run_enhance, train_options, train_sources, write_input  # noqa: E402
from quality_scores import score  # noqa: E402

from emdiffuse.models.checkpoints import load_checkpoint  # noqa: E402
from emdiffuse.models.mean_net import skip_gains  # noqa: E402
from emdiffuse.models.normalization import condition_from_model, from_model  # noqa: E402
from emdiffuse.training import trainer  # noqa: E402


def raw_skip(path: Path) -> list[list[float]]:
    """The mean network's skip of a checkpoint in raw units (output per input; a wider skip
    by its zero-frequency gain)."""
    config, state = load_checkpoint(path)
    w = np.array(skip_gains(state["mean.skip.weight"]))
    gain = from_model(config).half_range / condition_from_model(config).half_range
    return (w * gain).round(4).tolist()


def run_level(source, level, sizes, clean_train, init: str, steps: int, work: Path) -> dict:
    data = source.task_data(level, sizes, clean_train)
    entry = Entry(method="residual", budget=0.0)
    task, sources, voxel = train_sources(entry, data)
    options = train_options(entry, data, sizes, None)
    options.update(val_every=steps, ckpt_every=steps, mean_init=init, calibration_samples=0)
    inp = write_input(data.test_inputs[0], work / "input.ome.zarr", data.input_voxel)
    row: dict = {"level": level.key, "mean_init": init, "steps": steps}
    for label, n, lr in (("start", 1, 1e-12), ("trained", steps, options["lr"])):
        folder = work / f"{level.key}-{init}-{label}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        path = trainer.train(task, sources, folder, **{**options, "steps": n, "lr": lr},
                             seed=0, progress=False, voxel_size=voxel, device="cpu")  # fmt: skip
        seconds = time.perf_counter() - t0
        out = run_enhance(path, inp, work / f"out-{level.key}-{init}-{label}.ome.zarr",
                          samples=0, seed=0)  # fmt: skip
        scores = score(out["mean"], data.truth, data.eval_z, data.voxel_nm)
        row[label] = {"psnr": scores["psnr"], "ssim": scores["ssim"], "bias_pct": scores["bias_pct"],
                      "skip_raw": raw_skip(path), "train_seconds": seconds}  # fmt: skip
    return row


def report(result: dict) -> str:
    lines = [
        "# Mean network start at an equal number of steps (issue 14)", "",
        f"FlyEM, trained on `training_sample1` for exactly {result['steps']} steps (no time "
        "limit), scored on `training_sample2`: the posterior mean (`enhance --samples 0`). "
        "\"start\": the untrained model (its skip alone). Skip weights in raw units (output "
        "per input voxel; isotropic: per in-between slice, from the two bounding slices).", "",
        "| level | mean_init | start PSNR / SSIM | trained PSNR / SSIM | bias | skip at start | skip trained | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        s, t = r["start"], r["trained"]
        lines.append(
            f"| {r['level']} | {r['mean_init']} | {s['psnr']:.2f} / {s['ssim']:.3f} | "
            f"{t['psnr']:.2f} / {t['ssim']:.3f} | {t['bias_pct']:+.2f} % | {s['skip_raw']} | "
            f"{t['skip_raw']} | {t['train_seconds']:.0f} |"
        )
    lines += ["", f"Command: `{result['provenance']['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", nargs="+", default=["denoise-dose2"])
    p.add_argument("--inits", nargs="+", default=["input", "least-squares"])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--name", default="mean_init_steps")
    p.add_argument("--quick", action="store_true", help="small volumes, 20 steps (smoke run)")
    args = p.parse_args(argv)
    record = start_record(__file__, argv)
    try:
        source, levels, sizes = flyem_levels(args.levels, args.quick)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    steps = 20 if args.quick else args.steps
    clean_train = source.train_volume(sizes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mean_init_") as tmp:
        for level in levels:
            for init in args.inits:
                row = run_level(source, level, sizes, clean_train, init, steps, Path(tmp))
                rows.append(row)
                print(f"{level.key} {init}: start {row['start']['psnr']:.2f} dB -> trained "
                      f"{row['trained']['psnr']:.2f} dB / {row['trained']['ssim']:.3f}, bias "
                      f"{row['trained']['bias_pct']:+.2f} %, skip {row['start']['skip_raw']} -> "
                      f"{row['trained']['skip_raw']}", flush=True)  # fmt: skip
    result = {"steps": steps, "levels": args.levels, "rows": rows, "provenance": record}
    name = args.name + ("_quick" if args.quick else "")
    publish(name, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
