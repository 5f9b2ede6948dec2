"""Training-recipe variants of the residual kind, scored on the posterior mean (and, with
``--samples``, on one sample and the mean of N).

A quicker loop than ``run.py`` for questions about the mean network at a short budget: each
variant trains through the harness's own ``train_model`` (rate probe, cosine horizon, wall
time limit, model cache) on one FlyEM level, enhances the first test input with
``samples=0`` (one network evaluation) and scores it against the truth, with the error
head's intervals where the model has one. No peers, no report: one JSON line per variant,
printed and appended to ``--out``. ``--samples N`` also scores one sample and the mean of N
(the default sampler) with its intervals; ``--device cuda`` trains and enhances on a GPU
(the line records the device's name). A denoising variant with ``z_context`` (a model
reading neighbouring slices) is enhanced on the test slices with their noisy neighbours, as
``run.py`` enhances ``residual-z1``, and scored on the test slices alone.

    python benchmarks/quality/mean_recipe.py --level denoise-dose8 \\
        --variants '{}' '{"batch_size": 16, "residual_batch": 4}' [--seed 0] [--budget 150]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import quality_project as qp
from quality_data import flyem_levels
from quality_plan import Entry
from quality_scores import score, uncertainty_scores

ROOT = Path(__file__).resolve().parents[2]


class ScoredInput(NamedTuple):
    """An enhancement input (OME-Zarr) and which of its slices are the scored ones (None:
    all of them)."""

    path: Path
    scored: np.ndarray | None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--level", required=True, help="a FlyEM level key, e.g. denoise-dose8")
    p.add_argument(
        "--variants",
        nargs="+",
        type=json.loads,
        required=True,
        help="TrainSettings overrides, one JSON object per variant ({} = the recipe)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per variant")
    p.add_argument("--cache", type=Path, default=Path("/tmp/qcache"))
    p.add_argument("--device", default="cpu", help="where to train and enhance: cpu, cuda")
    p.add_argument(
        "--samples",
        type=int,
        default=0,
        help="N >= 2: also score one sample and the mean of N (0: the mean only)",
    )
    p.add_argument("--flyem-dir", type=Path, default=None, help="the FlyEM volumes' folder")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "quality" / "mean_recipe.jsonl",
    )
    args = p.parse_args(argv)
    if args.samples == 1 or args.samples < 0:
        p.error("--samples must be 0 (the mean only) or >= 2")
    try:
        source, levels, sizes = flyem_levels([args.level], flyem_dir=args.flyem_dir)
    except ValueError as error:  # the data missing, or an unknown level: one line, exit 2
        p.error(str(error))
    contexts = {int(extra.get("z_context") or 0) for extra in args.variants}
    if contexts != {0} and levels[0].task != "denoise":
        p.error("a z_context variant is scored here on denoise levels only; use run.py")
    data = source.task_data(levels[0], sizes, source.train_volume(sizes))
    work = args.cache / "work" / "mean_recipe"
    work.mkdir(parents=True, exist_ok=True)
    inputs = {c: scored_input(source, data, sizes, c, work) for c in sorted(contexts)}
    for extra in args.variants:
        inp = inputs[int(extra.get("z_context") or 0)]
        start = time.time()
        model = qp.train_model(Entry("residual", args.budget), data, sizes, args.cache,
                               budget=args.budget, probe_seconds=20, source="flyem",
                               seed=args.seed, extra=extra, device=args.device)  # fmt: skip
        line = {
            "level": args.level,
            "extra": extra,
            "seed": args.seed,
            "budget_s": args.budget,
            "steps": model.get("steps"),
            **scored(0, model["path"], inp, work, data, args),
        }
        if args.samples:
            line["sample"] = scored(1, model["path"], inp, work, data, args)
            line[f"mean_of_{args.samples}"] = scored(args.samples, model["path"], inp, work,
                                                     data, args)  # fmt: skip
        if args.device != "cpu":
            line.update(device=device_name(args.device), params=model.get("params"))
        line["wall_s"] = round(time.time() - start)
        print(json.dumps(line), flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


def scored_input(source, data, sizes, context: int, work: Path) -> ScoredInput:
    """The first test input as OME-Zarr: the scored slices themselves, or with ``context``
    noisy neighbours on each side of each (the same keyed noise; checked)."""
    name = f"in_{data.level.key}" + (f"_z{context}" if context else "")
    if not context:
        path = qp.write_input(data.test_inputs[0], work / f"{name}.ome.zarr", data.input_voxel)
        return ScoredInput(path, None)
    nb = source.neighbours(data.level, sizes, context)
    volume = nb.volumes[0]
    if not np.array_equal(volume[nb.scored], data.test_inputs[0]):
        raise SystemExit("the neighbours' scored slices are not the test input: noise keying "
                         "changed")  # fmt: skip
    return ScoredInput(
        qp.write_input(volume, work / f"{name}.ome.zarr", data.input_voxel), nb.scored
    )


def scored(samples: int, model: str, inp: ScoredInput, work: Path, data, args) -> dict:
    """PSNR, SSIM, bias (% of the range) and high-frequency spectrum error of an enhancement
    with ``samples`` (0: the posterior mean) against the truth, and its seconds; where it
    writes an uncertainty map (the mean of N, or the mean of a model with an error head),
    the map's coverage and its Spearman with the error per voxel and per block."""
    run = qp.run_enhance(model, inp.path, work / "out.ome.zarr", samples=samples, seed=0,
                         device=args.device)  # fmt: skip
    if "error" in run:
        raise SystemExit(f"enhance with samples={samples} failed: {run['error']}")
    if inp.scored is not None:  # enhanced with neighbours: keep the scored slices
        run["mean"] = run["mean"][inp.scored]
        if run["uncertainty"] is not None:
            run["uncertainty"] = run["uncertainty"][inp.scored]
    s = score(run["mean"], data.truth, data.eval_z, data.voxel_nm)
    out = {"psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4),
           "bias_pct": round(s["bias_pct"], 3), "spectrum_error": round(s["spectrum_error"], 3),
           "enhance_s": round(run["seconds"], 1)}  # fmt: skip
    if run["uncertainty"] is not None:  # the mean of N, or the mean's error head
        u = uncertainty_scores(run["mean"], run["uncertainty"], data.truth, data.eval_z,
                               run["uncertainty_meaning"])  # fmt: skip
        out["uncertainty"] = {"coverage": round(u["coverage"], 4),
                              "spearman": round(u["spearman"], 3),
                              "spearman_block": round(u["spearman_window"], 3)}  # fmt: skip
    return out


def device_name(device: str) -> str:
    """The accelerator's name (``torch.cuda.get_device_name``) or ``device`` itself."""
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


if __name__ == "__main__":
    main()
