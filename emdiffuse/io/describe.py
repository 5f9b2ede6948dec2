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
        "format": image.format,
        "details": dict(image.details),
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
    if image.levels is not None:  # a multiscale HDF5, N5 or precomputed input
        facts["levels"] = list(image.levels)
    local = local_path(path)
    if image.format == "OME-Zarr" and local.is_dir():
        group = zarr.open_group(str(local), mode="r")
        ms, version = multiscales(group)
        facts["ngff_version"] = version
        for i in range(len(ms["datasets"])):
            level = open_ome_zarr(path, i)
            facts["levels"].append(
                {"level": i, "shape": tuple(level.data.shape), "voxel_size_nm": tuple(level.voxel)}
            )
        facts["children"] = _child_images(group)
        facts["child_notes"] = {c: image_note(group[c].attrs) for c in facts["children"]}
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


def image_note(attributes) -> str:
    """What an image emdiffuse wrote holds, from its group's ``emdiffuse`` attributes: for
    an uncertainty map, calibrated interval half-widths or the plain standard deviation
    (``emdiffuse.pipeline.outputs``); "" when they do not say."""
    info = attributes.get("emdiffuse", {}) if hasattr(attributes, "get") else {}
    kind = info.get("uncertainty") if isinstance(info, dict) else None
    samples = info.get("samples") if isinstance(info, dict) else None
    if kind == "half-width":
        level = float(info.get("level", 0.0))
        source = (f"from {samples} samples" if info.get("source") != "error head"
                  else "of the mean, from the model's error head")  # fmt: skip
        return f"calibrated {level:.0%} intervals: output ± value per voxel (half-widths, {source})"
    if kind == "std":
        return f"standard deviation over {samples} samples per voxel (not calibrated)"
    return ""
