"""`emdiffuse demo`: the whole denoising job on built-in synthetic data."""

from __future__ import annotations

import argparse

from emdiffuse.models.sampler_names import DEFAULT_FIT_STEPS

HELP = "train a tiny denoiser on synthetic EM (or reuse it) and enhance a held-out volume"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="emdiffuse-demo", help="output folder (default ./emdiffuse-demo)")
    parser.add_argument("--size", default="small", choices=["small", "medium"], help="volume size")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget on first run")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampler steps (default: the {DEFAULT_FIT_STEPS} the model fitted "
                        "its schedule for)")
    parser.add_argument("--samples", type=int, default=2,
                        help="0: the posterior mean only (1 network evaluation per tile, "
                        "fastest); 1: one sample; N >= 2: their mean and the uncertainty "
                        "image (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    parser.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/emdiffuse)")
    parser.add_argument("--overwrite", action="store_true", help="redo an earlier demo in --out")


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: the demo loads torch, Dask and zarr
    from emdiffuse.demo import run_demo

    report = run_demo(
        args.out, size=args.size, minutes=args.minutes, steps=args.steps, samples=args.samples,
        workers=args.workers, cache=args.cache_dir, overwrite=args.overwrite,
    )
    return 0 if report["gain_db"] > 0 else 1
