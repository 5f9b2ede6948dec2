"""`emdiffuse info`: shape, dtype, chunks, voxel size and levels of an image."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = (
    "show format, shape, dtype, chunks, voxel size (nm) and scale levels of an image: OME-Zarr, "
    "TIFF, HDF5, N5, neuroglancer precomputed or MRC"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        help="OME-Zarr, TIFF, HDF5 (file.h5:/dataset), N5, neuroglancer precomputed "
        "(precomputed://URL) or MRC; a path or a URL",
    )


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
    if facts.get("format"):
        print(f"  format      {facts['format']}")
    for name, value in facts.get("details", {}).items():
        print(f"  {name:<11} {value}")
    print(f"  axes        {facts['axes']}")
    print(f"  shape       {facts['shape']}")
    print(f"  dtype       {facts['dtype']}")
    print(f"  chunks      {facts['chunks']}")
    print(f"  voxel size  {_nm(facts['voxel_size_nm'])}")
    known = all(v is not None for v in facts["voxel_size_nm"])
    if known and any(facts.get("translation_nm") or ()):
        print(f"  translation {_nm(facts['translation_nm'])}")
    if "ngff_version" in facts:
        print(f"  OME-Zarr    {facts['ngff_version']}")
    for level in facts["levels"]:
        print(f"  level {level['level']}     shape {level['shape']}  voxel {_nm(level['voxel_size_nm'])}")
    notes = facts.get("child_notes", {})
    for child in facts["children"]:
        note = notes.get(child)
        print(f"  child image {child}/" + (f"  {note}" if note else ""))
    if facts["problem"]:
        print(f"  not usable  {' '.join(facts['problem'].split())}")
    return 0
