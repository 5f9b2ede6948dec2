"""`emdiffuse info`: shape, dtype, chunks, voxel size and levels of an image."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "show shape, dtype, chunks, voxel size (nm) and pyramid levels of an OME-Zarr or TIFF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="OME-Zarr (path or URL) or TIFF stack")


def _nm(voxel: Sequence[float | None]) -> str:
    """``(30, 8, 8) nm``; an unknown size reads ``unknown``."""
    if all(v is None for v in voxel):
        return "unknown (convert and enhance take --voxel-size)"
    return "(" + ", ".join("unknown" if v is None else f"{v:.6g}" for v in voxel) + ") nm"


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: `emdiffuse --help` must not load Dask and zarr
    from emdiffuse.io import describe

    facts = describe(args.path)
    print(f"{facts['path']}")
    print(f"  axes        {facts['axes']}")
    print(f"  shape       {facts['shape']}")
    print(f"  dtype       {facts['dtype']}")
    print(f"  chunks      {facts['chunks']}")
    print(f"  voxel size  {_nm(facts['voxel_size_nm'])}")
    if "ngff_version" in facts:
        print(f"  OME-Zarr    {facts['ngff_version']}")
    for level in facts["levels"]:
        print(f"  level {level['level']}     shape {level['shape']}  voxel {_nm(level['voxel_size_nm'])}")
    for child in facts["children"]:
        print(f"  child image {child}/")
    if facts["problem"]:
        print(f"  not usable  {' '.join(facts['problem'].split())}")
    return 0
