"""What ``emdiffuse info`` shows: the facts of any readable image, usable or not."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import zarr

from emdiffuse.errors import InputError
from emdiffuse.io.ome_zarr import multiscales, open_ome_zarr
from emdiffuse.io.output_safety import RECORD_DIR
from emdiffuse.io.paths import local_path
from emdiffuse.io.volume import check_volume, open_image


def describe(path: str | Path) -> dict:
    """Facts about any readable image for ``emdiffuse info``: shape, dtype, chunks, voxel
    size (None where unknown), levels, child images, and why it cannot be enhanced (if so)."""
    path = str(path)
    image = open_image(path)
    try:
        check_volume(image, path)
        problem = None
    except InputError as error:
        problem = str(error)
    facts: dict = {
        "path": path,
        "axes": image.axes,
        "shape": tuple(image.data.shape),
        "dtype": str(image.data.dtype),
        "chunks": tuple(c[0] for c in image.data.chunks),
        "voxel_size_nm": tuple(image.voxel),
        "translation_nm": tuple(image.offset),
        "levels": [],
        "children": [],
        "problem": problem,
    }
    local = local_path(path)
    if local.is_dir():
        group = zarr.open_group(str(local), mode="r")
        ms, version = multiscales(group)
        facts["ngff_version"] = version
        for i in range(len(ms["datasets"])):
            level = open_ome_zarr(path, i)
            facts["levels"].append(
                {"level": i, "shape": tuple(level.data.shape), "voxel_size_nm": tuple(level.voxel)}
            )
        facts["children"] = _child_images(group)
    return facts


def _child_images(group: zarr.Group) -> list[str]:
    """The names of the group's child OME-Zarr images (e.g. ``uncertainty``)."""
    with warnings.catch_warnings():
        # zarr warns about each folder that is not a Zarr node, our run record among them
        warnings.filterwarnings("ignore", f"Object at {re.escape(RECORD_DIR)} is not recognized")
        children = list(group.groups())
    names = []
    for child_name, child in children:
        try:
            multiscales(child)
            names.append(child_name)
        except KeyError:
            continue
    return names
