"""`emdiffuse info`: shape, dtype, chunks, voxel size and levels of an image."""

from __future__ import annotations

import argparse

HELP = "show shape, dtype, chunks, voxel size (nm) and pyramid levels of an OME-Zarr or TIFF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="OME-Zarr (path or URL) or TIFF stack")


def run(args: argparse.Namespace) -> int:
    from emdiffuse.pipeline.io import describe

    facts = describe(args.path)
    print(f"{facts['path']}")
    print(f"  axes        {facts['axes']}")
    print(f"  shape       {facts['shape']}")
    print(f"  dtype       {facts['dtype']}")
    print(f"  chunks      {facts['chunks']}")
    print(f"  voxel size  {facts['voxel_size_nm']} nm")
    if "ngff_version" in facts:
        print(f"  OME-Zarr    {facts['ngff_version']}")
    for level in facts["levels"]:
        print(f"  level {level['level']}     shape {level['shape']}  voxel {level['voxel_size_nm']} nm")
    for child in facts["children"]:
        print(f"  child image {child}/")
    return 0
