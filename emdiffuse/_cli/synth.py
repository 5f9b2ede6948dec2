"""`emdiffuse synth OUT --shape Z,Y,X --task ...`: write a synthetic clean volume and the
degraded input of a task as multiscale OME-Zarr."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from emdiffuse.errors import InputError

HELP = "write a synthetic EM-like volume and its degraded version (OME-Zarr)"
DESCRIPTION = (
    "Write OUT/clean.ome.zarr (a seeded synthetic EM-like volume: cells with dark membranes, "
    "mitochondria, vesicles, granular cytoplasm) and the degraded input of the task: "
    "OUT/noisy.ome.zarr (denoise: Poisson-Gaussian noise at --dose), OUT/lowres.ome.zarr "
    "(super-resolve: blur + --factor x downsampling in y,x) or OUT/anisotropic.ome.zarr "
    "(isotropic: z-subsampling by --factor with slab averaging). Generated chunk by chunk in "
    "bounded memory."
)

OUTPUT_NAME = {
    "denoise": "noisy.ome.zarr",
    "super-resolve": "lowres.ome.zarr",
    "isotropic": "anisotropic.ome.zarr",
}
DTYPES = ("uint8", "uint16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="output directory (holds clean.ome.zarr + the degraded)")
    parser.add_argument("--shape", required=True, help="volume shape Z,Y,X in voxels")
    parser.add_argument(
        "--task", required=True, choices=sorted(OUTPUT_NAME), help="which degraded input"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--dose",
        type=float,
        default=20.0,
        help="denoise: electrons per voxel at full brightness (default 20)",
    )
    parser.add_argument(
        "--read-noise",
        type=float,
        default=1.0,
        help="denoise: Gaussian read noise in electrons rms (default 1)",
    )
    parser.add_argument(
        "--factor",
        type=int,
        default=4,
        help="super-resolve / isotropic: downsampling factor k >= 2 (default 4)",
    )
    parser.add_argument(
        "--voxel-size", type=float, default=8.0, help="isotropic voxel size in nm (default 8)"
    )
    parser.add_argument("--dtype", default="uint8", help="uint8 (default), uint16 or float32")
    parser.add_argument("--chunks", default="64,256,256", help="chunk shape Z,Y,X")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an OUT that an earlier synth wrote"
    )


def _triple(text: str, what: str) -> tuple[int, int, int]:
    parts = str(text).replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"{what} {text!r} is not three integers; give it as Z,Y,X") from None
    if len(values) != 3:
        raise InputError(f"{what} {text!r} has {len(values)} values; give three as Z,Y,X")
    if any(v <= 0 for v in values):
        raise InputError(f"{what} {text!r} has a zero or negative size; give positive Z,Y,X")
    return values  # type: ignore[return-value]


def _to_dtype(x, dtype: str):
    """[0, 1] float -> stored dtype (integers: scaled to the full range, clipped, rounded)."""
    if dtype == "float32":
        return x.astype(np.float32)
    top = float(np.iinfo(dtype).max)
    return (x.clip(0.0, 1.0) * top + 0.5).astype(dtype)


def _from_dtype(x, dtype):
    if np.dtype(dtype).kind in "ui":
        return x.astype(np.float32) / np.float32(np.iinfo(dtype).max)
    return x.astype(np.float32)


def _check(args) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    shape = _triple(args.shape, "shape")
    chunks = _triple(args.chunks, "chunks")
    if not args.voxel_size > 0:
        raise InputError(f"voxel size {args.voxel_size} nm must be positive; e.g. --voxel-size 8")
    if args.dtype not in DTYPES:
        raise InputError(f"dtype {args.dtype!r} is not supported; choose {', '.join(DTYPES)}")
    if args.factor < 2:
        raise InputError(f"factor {args.factor} must be 2 or more; e.g. --factor 4")
    if args.task == "denoise":
        if not args.dose > 0:
            raise InputError(f"dose {args.dose} must be positive (electrons per voxel)")
        if args.read_noise < 0:
            raise InputError(f"read noise {args.read_noise} must be >= 0 (electrons rms)")
    else:
        axes = shape[1:] if args.task == "super-resolve" else shape[:1]
        if min(axes) < args.factor:
            where = "y and x" if args.task == "super-resolve" else "z"
            raise InputError(
                f"shape {args.shape} is smaller than the factor {args.factor} in {where}; "
                "give a larger --shape or a smaller --factor"
            )
    # imported when the command runs: `emdiffuse --help` must not load Dask and zarr
    from emdiffuse.io import refuse_output

    refuse_output(args.output, overwrite=args.overwrite, kind="synth")
    return shape, chunks


def _write(data, path: Path, *, voxel_size, translation, chunks) -> None:
    # imported when the command runs: `emdiffuse --help` must not load Dask and zarr
    from emdiffuse.io import write_image

    write_image(
        data, str(path), voxel_size=voxel_size, chunks=chunks, overwrite=False,
        translation=translation,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    shape, chunks = _check(args)

    # imported when the command runs: `emdiffuse --help` must not load torch, Dask and zarr
    from emdiffuse import io
    from emdiffuse.training.degrade import degrade_volume, degraded_grid
    from emdiffuse.training.synthetic import synthetic_volume

    out = io.make_output_folder(args.output, "synth", replace=args.overwrite)
    start = time.perf_counter()
    v = float(args.voxel_size)
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))

    clean = synthetic_volume(shape, seed=args.seed, chunks=chunks, voxel_size=v)
    clean_path = out / "clean.ome.zarr"
    _write(
        _to_dtype(clean, args.dtype),
        clean_path,
        voxel_size=(v, v, v),
        translation=(0.0, 0.0, 0.0),
        chunks=chunks,
    )

    # the degraded volume is made from the stored clean volume (read back chunk by chunk),
    # so the clean voxels are generated once and the pair is consistent after quantisation
    stored = io.open_volume(str(clean_path)).data
    degraded = degrade_volume(
        _from_dtype(stored, args.dtype),
        args.task,
        factor=args.factor,
        dose=args.dose,
        read_noise=args.read_noise,
        seed=args.seed,
    )
    size, shift = degraded_grid(args.task, (v, v, v), factor=args.factor)
    out_chunks = tuple(min(c, n) for c, n in zip(chunks, degraded.shape, strict=True))
    degraded_path = out / OUTPUT_NAME[args.task]
    _write(
        _to_dtype(degraded, args.dtype),
        degraded_path,
        voxel_size=size,
        translation=shift,
        chunks=out_chunks,
    )

    seconds = time.perf_counter() - start
    voxels = int(np.prod(shape))
    print(f"wrote {out} in {seconds:.1f} s ({voxels / seconds / 1e6:.1f} Mvoxel/s)")
    print(f"  clean.ome.zarr        shape {shape}  voxel size {(v, v, v)} nm  {args.dtype}")
    detail = {
        "denoise": f"dose {args.dose:g} e-/voxel, read noise {args.read_noise:g} e-",
        "super-resolve": f"blur + {args.factor}x downsampling in y,x",
        "isotropic": f"{args.factor}x z-subsampling (slab mean)",
    }[args.task]
    print(
        f"  {OUTPUT_NAME[args.task]:<21} shape {tuple(degraded.shape)}  voxel size "
        f"{tuple(size)} nm  {args.dtype}  ({detail})"
    )
    return 0
