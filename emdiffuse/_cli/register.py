"""`emdiffuse register`: align a raw moving image (noisy / low-res) onto its fixed partner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emdiffuse.errors import InputError

HELP = "register a noisy/clean (or low/high) pair slice by slice and write the aligned moving image"
DESCRIPTION = (
    "Align MOVING onto FIXED, per z-slice: a sub-pixel rigid shift by phase correlation, then "
    "a dense optical flow (scikit-image ILK by default) estimated on lightly smoothed copies "
    "and applied once to the raw moving image. Writes the aligned moving image as OME-Zarr on "
    "the fixed grid and prints a quality table (cross-correlation with FIXED before, after the "
    "shift and after the flow, per slice and mean). RAFT (torchvision) is used only with "
    "--method raft and a local --raft-weights file; nothing is downloaded."
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "moving", help="image to align (e.g. the noisy or low-res one): OME-Zarr or TIFF"
    )
    parser.add_argument(
        "fixed", help="reference image (e.g. the clean or high-res one): OME-Zarr or TIFF"
    )
    parser.add_argument("output", help="output OME-Zarr for the aligned moving image")
    parser.add_argument("--method", choices=("rigid", "flow", "raft"), default="flow")
    parser.add_argument(
        "--solver", choices=("ilk", "tvl1"), default="ilk", help="optical-flow solver (flow)"
    )
    parser.add_argument(
        "--smooth-sigma", type=float, default=1.0, help="Gaussian (voxels) before estimating"
    )
    parser.add_argument("--radius", type=int, default=7, help="ILK window radius (voxels)")
    parser.add_argument(
        "--flow-sigma", type=float, default=4.0, help="Gaussian smoothing of the flow (voxels)"
    )
    parser.add_argument(
        "--raft-weights", default=None, help="local torchvision RAFT weights (.pth/.safetensors)"
    )
    parser.add_argument(
        "--upsample",
        action="store_true",
        help="moving is on an integer-times coarser xy grid (low/high pair): resample it onto the fixed grid",
    )
    parser.add_argument(
        "--voxel-size", default=None, help="Z,Y,X in nm when the inputs do not record it"
    )
    parser.add_argument(
        "--chunks", type=_ints, default=None, help="output chunks Z,Y,X (default 8,256,256)"
    )
    parser.add_argument(
        "--levels", type=int, default=None, help="extra pyramid levels (default: automatic)"
    )
    parser.add_argument("--report", default=None, help="write a before|after overlay PNG here")
    parser.add_argument(
        "--report-json", default=None, help="write the per-slice report as JSON here"
    )
    parser.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: `emdiffuse --help` must not load torch and Dask
    from emdiffuse.training.registration import register_volumes

    if args.report_json is not None and not Path(args.report_json).parent.exists():
        raise InputError(
            f"the folder for --report-json {args.report_json} does not exist; create it first"
        )
    report = register_volumes(
        args.moving,
        args.fixed,
        args.output,
        method=args.method,
        solver=args.solver,
        smooth_sigma=args.smooth_sigma,
        radius=args.radius,
        flow_sigma=args.flow_sigma,
        raft_weights=args.raft_weights,
        voxel_size=args.voxel_size,
        upsample=args.upsample,
        overwrite=args.overwrite,
        chunks=args.chunks,
        levels=args.levels,
        report_png=args.report,
        num_workers=args.workers,
    )
    print(report.table())
    if args.report_json is not None:
        Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=1))
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0
