"""Default tiling: computed voxels per output voxel against seams and quality (issue 16, item 5).

    python benchmarks/tiling.py [--shape 4 1024 1024] [--configs 256/64 256/32 512/48 ...]
        [--sampler dpmpp_2m] [--steps 8] [--spacing karras] [--start-noise 1.5]
        [--name tiling] [--quick] [--table-only]

Every tiling ``T/O`` (tile side T, overlap O, output-grid voxels) enhances the same held-out
volume (the demo's synthetic EM at its dose, ``--shape``, far from the training region)
through the real pipeline (``emdiffuse.enhance``: OME-Zarr in and out, Dask's threads,
one tile per batch) with the demo's trained denoiser (cached by ``emdiffuse demo``; trained
here when missing), twice: the posterior mean (``samples=0``, one evaluation per tile) and
one sample (``--sampler``/``--steps``, the defaults; ``--spacing``, ``--start-noise``: a
truncated start). The first tiling of ``--configs`` (the
old default) is the baseline. There is no seam-free reference: the network's middle
self-attention spans the whole tile, so a larger tile changes every voxel a little, and one
tile per 1024² slice would need ~65 GiB on a CPU.

Per tiling:

* ``redundancy``: computed voxels per output voxel (``Lattice.redundancy``) on this volume
  and on 2048² and 8192² slices (the cost of the overlaps, and what the network time scales
  with);
* the mean: PSNR and SSIM against the clean volume; ``dev``: RMS difference from the
  baseline's mean in % of the clean range, in all and by distance to the nearest tile edge of
  this tiling; ``edge_excess`` of its gradient at tile edges (:mod:`emdiffuse.pipeline.seams`)
  and its ``floor``, the same statistic read half a stride inside the tiles, where there is no
  edge (what it reads by chance on this content);
* the sample: PSNR, the texture's (sample − mean) ``std_ratio`` and ``mid_ratio`` in overlap
  zones against tile interiors, ``edge_excess`` and its floor;
* wall seconds of both runs (a ratio to the first tiling: ``--configs`` order).

Writes ``results/<name>.json`` (with provenance), ``<name>.md`` (table, command) and
``<name>.png`` (RMS change of the mean from the baseline by distance to the nearest tile
edge).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from common import RESULTS, start_record, write_results

DEFAULT_CONFIGS = ("256/64", "256/32", "256/24", "384/32", "512/64", "512/48", "512/32")
DISTANCE_BINS = (0, 4, 8, 16, 32, 64)  # voxels to the nearest tile edge: [0,4), ..., [64, inf)
BIG_SLICES = (2048, 8192)


def parse_config(text: str) -> tuple[int, int]:
    tile, overlap = (int(v) for v in text.split("/"))
    return tile, overlap


def run(noisy_path: Path, model: Path, out: Path, tile: int, overlap: int, **kw) -> tuple[np.ndarray, float]:
    """One enhancement through the pipeline; its level-0 output (raw units) and wall seconds."""
    from emdiffuse import enhance

    start = time.perf_counter()
    enhance(noisy_path, model, out, tile=tile, overlap=overlap, scheduler="threads",
            progress=False, dtype="float32", batch_size=1, **kw)  # fmt: skip
    seconds = time.perf_counter() - start
    return np.asarray(zarr.open_array(f"{out}/0", mode="r")[...], dtype=np.float64), seconds


def deviation_profile(diff: np.ndarray, tile: int, overlap: int, span: float) -> dict[str, float]:
    """RMS of ``diff`` (zyx) in % of ``span`` by distance to the nearest tile edge (y or x)."""
    from emdiffuse.pipeline.seams import distance_to_tile_edge

    _, ny, nx = diff.shape
    dist = np.minimum(distance_to_tile_edge(ny, tile, overlap)[:, None],
                      distance_to_tile_edge(nx, tile, overlap)[None, :])  # fmt: skip
    profile = {}
    edges = (*DISTANCE_BINS, np.inf)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (dist >= lo) & (dist < hi)
        label = f"{lo}-{hi}" if np.isfinite(hi) else f"{lo}+"
        profile[label] = float(100 * np.sqrt(np.mean(diff[:, sel] ** 2)) / span) if sel.any() else None
    return profile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(4, 1024, 1024), metavar=("Z", "Y", "X"))
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="tile/overlap, ...")
    p.add_argument("--sampler", default=None, help="default: the pipeline's")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    p.add_argument("--spacing", default=None, help="default: the sampler's")
    p.add_argument("--start-noise", type=float, default=None, help="σ of a truncated start")
    p.add_argument("--minutes", type=float, default=5.0, help="the demo model's training budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="tiling")
    p.add_argument("--quick", action="store_true", help="2x256x256, two tilings: a smoke run")
    p.add_argument("--table-only", action="store_true", help="rewrite <name>.md/.png from its JSON")
    args = p.parse_args(argv)
    if args.table_only:
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(report(result))
        plot(result, RESULTS / f"{args.name}.png")
        return 0
    record = start_record(sys.argv[0], argv)

    from emdiffuse import metrics
    from emdiffuse.demo import HELD_OUT_ORIGIN, cache_dir, demo_model
    from emdiffuse.io import write_image
    from emdiffuse.models.checkpoints import load_checkpoint
    from emdiffuse.models.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS
    from emdiffuse.pipeline.correlation import calibrated_correlation
    from emdiffuse.pipeline.lattice import Lattice
    from emdiffuse.pipeline.run_record import read_run_config
    from emdiffuse.pipeline.seams import edge_excess, texture_ratios
    from emdiffuse.pipeline.settings import RunSettings
    from emdiffuse.training.demo_model import demo_pair

    shape = (2, 256, 256) if args.quick else tuple(args.shape)
    configs = [parse_config(c) for c in (["128/32", "128/16"] if args.quick else args.configs)]
    sampler = args.sampler or DEFAULT_SAMPLER
    steps = args.steps or DEFAULT_STEPS
    model, cached = demo_model(args.minutes, cache=cache_dir(), seed=args.seed)
    calibration = load_checkpoint(model)[0].calibration or {}
    noisy, clean = demo_pair(shape, origin=HELD_OUT_ORIGIN, seed=args.seed, noise_seed=args.seed + 101)
    span = float(clean.max() - clean.min())
    sample_kw = dict(samples=1, sampler=sampler, steps=steps, seed=args.seed,
                     spacing=args.spacing, start_noise=args.start_noise)  # fmt: skip
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        noisy_path = tmp / "noisy.ome.zarr"
        write_image(noisy, noisy_path, voxel_size=(8.0, 8.0, 8.0), chunks=(1, 256, 256))
        for i, (tile, overlap) in enumerate(configs):
            mean, t_mean = run(noisy_path, model, tmp / f"{i}-mean.ome.zarr", tile, overlap, samples=0)
            sample, t_sample = run(noisy_path, model, tmp / f"{i}-sample.ome.zarr", tile, overlap, **sample_kw)
            # the correlation the sample's blend used (the run record's; absent: 0)
            rho = read_run_config(tmp / f"{i}-sample.ome.zarr").get("residual_correlation", 0.0)
            base = base or (mean, sample)
            texture = sample - mean
            half = (tile - overlap) // 2  # half a stride: inside the tiles
            row = {
                "tile": tile, "overlap": overlap,
                "redundancy": Lattice(shape, tile, overlap).redundancy,
                **{f"redundancy_{n}": Lattice((1, n, n), tile, overlap).redundancy for n in BIG_SLICES},
                "mean_psnr": metrics.psnr(mean, clean, data_range=span),
                "mean_ssim": metrics.ssim(mean, clean, data_range=span),
                "mean_dev": float(100 * np.sqrt(np.mean((mean - base[0]) ** 2)) / span),
                "mean_dev_by_edge_distance": deviation_profile(mean - base[0], tile, overlap, span),
                "mean_edge_excess": edge_excess(mean, tile, overlap),
                "mean_edge_excess_floor": edge_excess(mean, tile, overlap, shift=half),
                "sample_psnr": metrics.psnr(sample, clean, data_range=span),
                "sample_ssim": metrics.ssim(sample, clean, data_range=span),
                **texture_ratios(texture, tile, overlap),
                "sample_edge_excess": edge_excess(sample, tile, overlap),
                "sample_edge_excess_floor": edge_excess(sample, tile, overlap, shift=half),
                "seconds_mean": t_mean, "seconds_sample": t_sample,
                "residual_correlation": rho,
            }  # fmt: skip
            rows.append(row)
            print(f"{tile}/{overlap}: redundancy {row['redundancy_8192']:.3f}  mean PSNR "
                  f"{row['mean_psnr']:.2f} dev {row['mean_dev']:.3f} %  edge {row['mean_edge_excess']:+.4f}"
                  f" (floor {row['mean_edge_excess_floor']:+.4f})  sample PSNR {row['sample_psnr']:.2f}"
                  f" std {row['std_ratio']:.3f} mid {row['mid_ratio']:.3f} edge "
                  f"{row['sample_edge_excess']:+.4f} (floor {row['sample_edge_excess_floor']:+.4f})  "
                  f"{t_mean + t_sample:.0f} s", flush=True)  # fmt: skip
    result = {
        "shape": list(shape), "sampler": sampler, "steps": steps, "model": str(model),
        "spacing": args.spacing, "start_noise": args.start_noise,
        "model_cached": cached,
        # the calibration's value when it holds for this sampling, else None: measured per run
        "residual_correlation": calibrated_correlation(calibration, RunSettings(**sample_kw)),
        "noisy_psnr": metrics.psnr(noisy, clean, data_range=span),
        "rows": rows, "provenance": record,
    }  # fmt: skip
    name = args.name + ("_quick" if args.quick else "")
    write_results(name, result)
    (RESULTS / f"{name}.md").write_text(report(result))
    plot(result, RESULTS / f"{name}.png")
    print(report(result))
    return 0


def _correlation_text(result: dict) -> str:
    """How the sample's residuals were blended: with the calibration's correlation, or with
    one each run measured on its own tiles (rows with ``residual_correlation``)."""
    measured = [r["residual_correlation"] for r in result["rows"] if "residual_correlation" in r]
    if result.get("residual_correlation") is not None:
        return (f"the residuals blended with the correlation ρ = "
                f"{result['residual_correlation']:.3f} the model's calibration measured.")  # fmt: skip
    if measured:
        values = ", ".join(f"{v:.3f}" for v in measured)
        return ("the model's calibration does not hold for this sampling, so each run measured "
                f"the residuals' correlation on its own tiles before blending: ρ = {values} "
                "(in the order of the rows).")  # fmt: skip
    return ("the residuals blended as independent (ρ = 0: the model's calibration predates "
            "the correlation).")


def report(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]
    lines = [
        "# Default tiling: redundancy against seams and quality",
        "",
        f"`{result['provenance']['command']}`",
        "",
        f"Held-out synthetic EM {'×'.join(map(str, result['shape']))} at the demo's dose "
        f"(noisy PSNR {result['noisy_psnr']:.2f} dB), the demo's denoiser, through the pipeline: "
        f"the posterior mean (1 evaluation) and one sample ({result['sampler']}@{result['steps']}"
        + (f", {result['spacing']} spacing" if result.get("spacing") else "")
        + (f", from σ {result['start_noise']:g}" if result.get("start_noise") else "") + "); "
        + _correlation_text(result),
        "Redundancy: computed voxels per output voxel on this volume / a 2048² / an 8192² slice. "
        f"dev: RMS change of the mean from {base['tile']}/{base['overlap']}'s (% of the clean "
        "range); near: the same within 4 voxels of this tiling's tile edges. edge: gradient "
        "excess at tile edges (floor: read half a stride inside the tiles). std/mid: texture "
        "ratio overlap/interior (target 0.95–1.05). Time: both runs, relative to "
        f"{base['tile']}/{base['overlap']}.",
        "",
        "| tile/overlap | redundancy | mean PSNR | dev % | near % | mean edge (floor) "
        "| sample PSNR | std | mid | sample edge (floor) | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t0 = base["seconds_mean"] + base["seconds_sample"]
    for r in rows:
        near = r["mean_dev_by_edge_distance"]["0-4"]
        lines.append(
            f"| {r['tile']}/{r['overlap']} | {r['redundancy']:.2f} / {r['redundancy_2048']:.2f} / "
            f"{r['redundancy_8192']:.2f} | {r['mean_psnr']:.2f} | {r['mean_dev']:.3f} | "
            f"{near:.3f} | {100 * r['mean_edge_excess']:+.2f} % ({100 * r['mean_edge_excess_floor']:+.2f}) | "
            f"{r['sample_psnr']:.2f} | {r['std_ratio']:.3f} | {r['mid_ratio']:.3f} | "
            f"{100 * r['sample_edge_excess']:+.2f} % ({100 * r['sample_edge_excess_floor']:+.2f}) | "
            f"{(r['seconds_mean'] + r['seconds_sample']) / t0:.2f}× |"
        )
    lines += ["", *verdict(rows)]
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> list[str]:
    """The default tiling's row against the first (the old default), in words."""
    from emdiffuse.pipeline.prepare import choose_tile

    tile, overlap = choose_tile((8192, 8192), 4, 1, None, None)
    base = rows[0]
    row = next((r for r in rows if (r["tile"], r["overlap"]) == (tile, overlap)), None)
    if row is None or row is base:
        return []
    saved = 1 - row["redundancy_8192"] / base["redundancy_8192"]
    return [
        f"The default tiling is {tile}/{overlap}: {row['redundancy_8192']:.2f} computed voxels "
        f"per output voxel on an 8192² slice against {base['redundancy_8192']:.2f} for "
        f"{base['tile']}/{base['overlap']} ({100 * saved:.0f} % less network work). Here its "
        f"posterior mean differs from {base['tile']}/{base['overlap']}'s by {row['mean_dev']:.3f} % "
        f"of the clean range RMS ({row['mean_dev_by_edge_distance']['0-4']:.3f} % within 4 voxels "
        f"of a tile edge), mean PSNR {row['mean_psnr'] - base['mean_psnr']:+.2f} dB, sample PSNR "
        f"{row['sample_psnr'] - base['sample_psnr']:+.2f} dB (one draw), texture ratios "
        f"{row['std_ratio']:.3f}/{row['mid_ratio']:.3f} against {base['std_ratio']:.3f}/"
        f"{base['mid_ratio']:.3f}.",
    ]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["rows"][1:]:
        prof = r["mean_dev_by_edge_distance"]
        labels = [k for k, v in prof.items() if v is not None]
        ax.plot(labels, [prof[k] for k in labels], marker="o", label=f"{r['tile']}/{r['overlap']}")
    ax.set_xlabel("voxels to the nearest tile edge")
    base = result["rows"][0]
    ax.set_ylabel(f"RMS change of the mean vs {base['tile']}/{base['overlap']} (% of range)")
    ax.set_title("What the tiling changes in the posterior mean")
    ax.legend(title="tile/overlap")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
