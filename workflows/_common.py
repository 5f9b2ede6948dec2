"""Shared argument handling for the workflow scripts (run them, don't import this)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from emdiffuse.errors import InputError
from emdiffuse.models.sampler_names import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLER_NAMES,
    SPACING_NAMES,
)
from emdiffuse.pipeline.preflight import CONNECT_TIMEOUT, connect


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("input", help="input OME-Zarr (path or URL) or TIFF stack")
    p.add_argument("output", help="output OME-Zarr")
    p.add_argument("--model", required=True, help="checkpoint (.safetensors) for this task")
    p.add_argument("--scheduler-address", help="tcp://host:port of a running Dask scheduler "
                   "(dask-jobqueue, dask-gateway, `dask scheduler`); default: a LocalCluster")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="LocalCluster workers (default: one per GPU, else 2)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT,
                   help=f"seconds to wait for --scheduler-address (default {CONNECT_TIMEOUT:g})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"sampler steps = network evaluations per sample (default {DEFAULT_STEPS})")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES,
                   help=f"sampler (default {DEFAULT_SAMPLER}; ddpm is the reference's)")
    p.add_argument("--spacing", default=None, choices=SPACING_NAMES,
                   help="step spacing (default: time for ddpm, logsnr for the others)")
    p.add_argument("--samples", type=int, default=1, help="samples per voxel; >=2 also writes uncertainty/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=None, help="tile side in voxels on the output grid")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in voxels")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


@contextlib.contextmanager
def client_for(args: argparse.Namespace):
    """A distributed Client on the given scheduler (an error when it does not answer within
    --connect-timeout), or on a LocalCluster started here."""
    from distributed import Client, LocalCluster

    if args.scheduler_address:
        with connect(args.scheduler_address, args.connect_timeout) as client:
            yield client
        return
    with LocalCluster(n_workers=args.workers or 2, threads_per_worker=1) as cluster, Client(cluster) as client:
        yield client


def run(args: argparse.Namespace) -> None:
    """Enhance ``args.input`` into ``args.output`` on the chosen cluster and say where it went.
    Bad input (an unreachable scheduler included) ends the script with one line, exit 2."""
    try:
        _run(args)
    except InputError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> None:
    import emdiffuse

    with client_for(args) as client:
        print(f"Dask dashboard: {client.dashboard_link}")
        result = emdiffuse.enhance(
            args.input,
            args.model,
            args.output,
            steps=args.steps,
            sampler=args.sampler,
            spacing=args.spacing,
            samples=args.samples,
            seed=args.seed,
            tile=args.tile,
            overlap=args.overlap,
            client=client,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    print(f"wrote {args.output}: {dict(result.sizes)} (view: emdiffuse view {args.output})")
