"""`emdiffuse convert`: any readable image (TIFF, OME-Zarr, HDF5, N5, neuroglancer
precomputed, MRC) -> multiscale OME-Zarr 0.5."""

from __future__ import annotations

import argparse

from emdiffuse.errors import InputError

HELP = (
    "convert a TIFF stack, OME-Zarr, HDF5, N5, neuroglancer precomputed or MRC volume into "
    "multiscale OME-Zarr 0.5"
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return values


def _levels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more (0: level 0 only)")
    return value


def _level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more (0: the finest level)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        help="TIFF stack, OME-Zarr, HDF5 (file.h5:/dataset), N5, neuroglancer precomputed "
        "(precomputed://URL) or MRC; a path or a URL",
    )
    parser.add_argument("output", help="output OME-Zarr path (e.g. out.ome.zarr)")
    parser.add_argument("--voxel-size", help="Z,Y,X in nm (or one number); required if the input lacks it")
    parser.add_argument(
        "--level", type=_level, default=0, help="scale level of a multiscale input (default 0)"
    )
    parser.add_argument("--chunks", type=_ints, default=None, help="output chunks Z,Y,X (default 64,256,256)")
    parser.add_argument("--levels", type=_levels, default=None, help="extra pyramid levels (default: automatic)")
    parser.add_argument("--overwrite", action="store_true", help="replace an OME-Zarr that emdiffuse wrote")


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: `emdiffuse --help` must not load Dask and zarr
    from emdiffuse.io import check_finite, open_volume, refuse_output, write_image

    refuse_output(args.output, args.input, overwrite=args.overwrite, resumable=False)
    volume = open_volume(args.input, level=args.level, voxel_size=args.voxel_size)
    check_finite(volume)
    if args.chunks is not None and len(args.chunks) != volume.ndim:
        raise InputError(f"--chunks has {len(args.chunks)} values but the image has {volume.ndim} axes")
    write_image(
        volume.data,
        args.output,
        voxel_size=volume.voxel_size,
        translation=volume.translation,
        chunks=args.chunks,
        axes=volume.axes,
        levels=args.levels,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output}: shape {volume.shape}, {volume.dtype}, voxel size {volume.voxel_size} nm")
    return 0
