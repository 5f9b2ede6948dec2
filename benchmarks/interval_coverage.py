"""The calibrated intervals and the residual correlation under other sampling (issue 14, parts 3-4).

    python benchmarks/interval_coverage.py [--samplings dpmpp_2m@8 ddim@8 dpmpp_2m@4:karras:1.5 ...]
        [--samples 4] [--side 512] [--name interval_coverage] [--table-only]

A model's calibration is fitted at the end of training on samples of the run defaults
(``dpmpp_2m``, 8 steps). A run may sample otherwise: another sampler or step count, or a
truncated start (``start_noise``). For each sampling ``SAMPLER@STEPS[:SPACING[:START]]``,
the demo's denoiser (cached by ``emdiffuse demo``; trained when missing) draws ``--samples``
samples of each 256² tile of a held-out synthetic EM slice (``--side``², the demo's dose) and
this reports, in model space:

* ``calibrated``: the share of voxels whose truth lies within the mean of the samples ± the
  calibrated half-width (``models.calibration.half_widths``, the model's record; level 90 %);
* ``rescaled``: the same after the rescaling ``enhance`` applies to a sampling other than the
  calibration's (``pipeline.correlation.spread_ratio``: the ratio of the two samplings' RMS
  spreads on 2 samples of 2 tiles, as the run's pilot measures it), and that ratio;
* ``plain``: the same for ± 1.645 × the standard deviation over the samples (what an
  uncalibrated 90 % interval would be);
* the mean standard deviation over samples, and the RMS error of their mean;
* ``rho``: how much the samples' residual parts correlate
  (``models.calibration.residual_correlation``), the value the pipeline's texture blend needs
  for this sampling (``pipeline/correlation.py``).

Writes ``results/<name>.json`` (with provenance) and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from common import RESULTS, publish, start_record

DEFAULT_SAMPLINGS = ("dpmpp_2m@8", "dpmpp_2m@16", "dpmpp_2m@4", "ddim@8", "dpmpp_2m_sde@8",
                     "dpmpp_2m@4:karras:1.5", "dpmpp_2m@4:karras:2")  # fmt: skip
TILE = 256
Z90 = 1.6448536269514722  # the standard normal's 95th percentile: a two-sided 90 % interval


def parse_sampling(text: str) -> dict:
    """``SAMPLER@STEPS[:SPACING[:START]]`` -> the Enhancer's sampling keywords."""
    head, *rest = text.split(":")
    sampler, steps = head.split("@")
    options = {"sampler": sampler, "steps": int(steps)}
    if rest and rest[0]:
        options["spacing"] = rest[0]
    if len(rest) > 1:
        options["start_noise"] = float(rest[1])
    return options


def measure(enhancer, tiles: np.ndarray, truth: np.ndarray, sampling: dict, samples: int,
            rng: np.random.Generator) -> dict:  # fmt: skip
    """One sampling's row: coverage of both intervals, spread, error and residual correlation."""
    from emdiffuse.models import calibration
    from emdiffuse.models.sampler_names import STOCHASTIC

    mean = enhancer.posterior_mean(tiles)
    draws, residuals = [], []
    start = time.perf_counter()
    for _ in range(samples):
        noise = rng.standard_normal(tiles.shape).astype(np.float32)
        step_noise = None
        if sampling["sampler"] in STOCHASTIC:
            steps_noise = rng.standard_normal((sampling["steps"] + 1, *tiles.shape))
            step_noise = steps_noise.astype(np.float32).__getitem__
        m, r = enhancer.sample_parts(tiles, noise, mean=mean, step_noise=step_noise, **sampling)
        draws.append(np.clip(m + r, -1.0, 1.0))
        residuals.append(r)
    draws = np.stack(draws)
    estimate, std = draws.mean(axis=0), draws.std(axis=0, ddof=1)
    error = np.abs(estimate - truth)
    widths = calibration.half_widths(std, calibration=enhancer.config.calibration, samples=samples)
    return {
        **sampling,
        "draws": draws,  # for the rescaled column (rescaled_coverage); not written out
        "calibrated": float((error <= widths).mean()),
        "plain": float((error <= Z90 * std).mean()),
        "mean_std": float(std.mean()),
        "rmse": float(np.sqrt(np.mean((estimate - truth) ** 2))),
        "rho": calibration.residual_correlation(np.stack(residuals)),
        "seconds": time.perf_counter() - start,
    }


def rescaled_coverage(draws: np.ndarray, fitted: np.ndarray, truth: np.ndarray,
                      record: dict) -> tuple[float, float]:  # fmt: skip
    """``(coverage, ratio)`` of the calibrated half-widths rescaled as the pipeline rescales
    another sampling's (``pipeline.correlation.spread_ratio``): the ratio from the first
    ``PILOT_SAMPLES`` draws of the first ``PILOT_TILES`` tiles of this sampling and of the
    sampling the calibration was fitted on (``fitted``), the coverage over every tile."""
    from emdiffuse.models import calibration
    from emdiffuse.pipeline.correlation import PILOT_SAMPLES, PILOT_TILES, spread_ratio

    def pilot(d: np.ndarray) -> np.ndarray:
        return d[:PILOT_SAMPLES, :PILOT_TILES].reshape(PILOT_SAMPLES, -1)

    ratio = spread_ratio(pilot(fitted), pilot(draws))
    std = draws.std(axis=0, ddof=1)
    widths = calibration.half_widths(std, calibration=record, samples=len(draws), ratio=ratio)
    return float((np.abs(draws.mean(axis=0) - truth) <= widths).mean()), ratio


def label(row: dict) -> str:
    text = f"{row['sampler']}@{row['steps']}"
    if row.get("spacing"):
        text += f", {row['spacing']}"
    if row.get("start_noise"):
        text += f", from σ {row['start_noise']:g}"
    return text


def report(result: dict) -> str:
    cal = result["calibration"]
    lines = [
        "# Calibrated intervals and residual correlation under other sampling",
        "",
        f"`{result['provenance']['command']}`",
        "",
        f"The demo's denoiser, whose calibration was fitted on `{cal['sampler']}@{cal['steps']}` "
        f"samples (level {cal['level']:.0%}, its ρ {cal.get('residual_correlation', 0):.3f}), on "
        f"held-out synthetic EM ({result['side']}² at the demo's dose, {result['tiles']} tiles "
        f"of {TILE}²), {result['samples']} samples per tile, model space. Coverage: the share of "
        "voxels whose truth lies in the mean of the samples ± the calibrated half-width, or ± "
        "1.645 × their standard deviation (plain); target 87–93 %. ρ: how much two samples' "
        "residual parts correlate, the value the pipeline's texture blend needs.",
        "",
        "| sampling | calibrated coverage | rescaled (ratio) | plain ±1.645σ | mean σ | RMSE of the mean | ρ | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        rescaled = (f"**{row['rescaled']:.3f}** ({row['ratio']:.3f})" if "rescaled" in row
                    else "—")  # fmt: skip
        lines.append(
            f"| {label(row)} | {row['calibrated']:.3f} | {rescaled} | {row['plain']:.3f} | "
            f"{row['mean_std']:.4f} | {row['rmse']:.4f} | {row['rho']:.3f} | {row['seconds']:.0f} |"
        )
    lines += [
        "",
        "Rescaled: what `enhance` writes since the eleventh session for a sampling other than the "
        "calibration's: the half-widths times the ratio of the two samplings' RMS spreads, "
        "measured (as the pipeline's pilot does) on 2 samples of 2 of the tiles; the fitted "
        "sampling itself is not rescaled.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samplings", nargs="+", default=list(DEFAULT_SAMPLINGS))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--side", type=int, default=512, help="the held-out slice (a multiple of 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="interval_coverage")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    if args.table_only:
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        publish(args.name, result, report(result))
        return 0
    record = start_record(sys.argv[0], argv)

    from emdiffuse.demo import HELD_OUT_ORIGIN, cache_dir, demo_model
    from emdiffuse.models.calibration import fitted_sampling
    from emdiffuse.models.enhancer import Enhancer
    from emdiffuse.models.normalization import condition_from_model, from_model
    from emdiffuse.training.demo_model import demo_pair

    model, _ = demo_model(5.0, cache=cache_dir(), seed=args.seed)
    enhancer = Enhancer.load(model)
    noisy, clean = demo_pair((1, args.side, args.side), origin=HELD_OUT_ORIGIN, seed=args.seed,
                             noise_seed=args.seed + 101)  # fmt: skip
    cond = condition_from_model(enhancer.config).forward(noisy.astype(np.float32), clip=True)[0]
    target = from_model(enhancer.config).forward(clean.astype(np.float32))[0]
    n = args.side // TILE

    def tiled(image: np.ndarray) -> np.ndarray:
        cut = image[: n * TILE, : n * TILE].reshape(n, TILE, n, TILE).swapaxes(1, 2)
        return cut.reshape(n * n, 1, TILE, TILE).astype(np.float32)

    tiles, truth = tiled(cond), tiled(target)
    rng = np.random.default_rng([args.seed, 0xC0FE])
    calibration = dict(enhancer.config.calibration or {})
    sampler, steps, spacing = fitted_sampling(calibration)
    fitted_text = f"{sampler}@{steps}"
    rows, fitted = [], None
    for text in [fitted_text] + [t for t in args.samplings if t != fitted_text]:
        row = measure(enhancer, tiles, truth, parse_sampling(text), args.samples, rng)
        draws = row.pop("draws")
        if fitted is None:
            fitted = draws
        else:
            row["rescaled"], row["ratio"] = rescaled_coverage(draws, fitted, truth, calibration)
        if text in args.samplings:
            rows.append(row)
        print(f"{label(row)}: calibrated {row['calibrated']:.3f} rescaled "
              f"{row.get('rescaled', row['calibrated']):.3f} plain {row['plain']:.3f} "
              f"rho {row['rho']:.3f} ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    result = {
        "model": str(model), "calibration": calibration, "side": args.side, "tiles": n * n,
        "samples": args.samples, "rows": rows, "provenance": record,
    }  # fmt: skip
    publish(args.name, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
