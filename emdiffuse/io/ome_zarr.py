"""Read OME-Zarr: NGFF 0.4 (zarr v2) and 0.5 (zarr v3), any pyramid level, local or URL.

Axes other than space (t, c) of size 1 are dropped, so the pipeline sees zyx / yx; scales
and translations (per level and for the whole multiscale) are converted to nm.
"""

from __future__ import annotations

import dask.array as da
import zarr

from emdiffuse.errors import InputError
from emdiffuse.io.damaged import CheckedArray
from emdiffuse.io.image import RawImage, nm_per_unit
from emdiffuse.io.paths import is_url, local_path

_ZARR_FILES = ("zarr.json", ".zgroup", ".zarray", ".zattrs")


def multiscales(group: zarr.Group) -> tuple[dict, str]:
    """The group's first multiscale and its NGFF version; KeyError when it has none."""
    attrs = group.attrs.asdict()
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]["multiscales"][0], attrs["ome"].get("version", "0.5")
    if "multiscales" in attrs:
        ms = attrs["multiscales"][0]
        return ms, ms.get("version", "0.4")
    raise KeyError("multiscales")


def _transforms(transforms: list[dict], ndim: int) -> tuple[list[float], list[float]]:
    scale = [1.0] * ndim
    translation = [0.0] * ndim
    for item in transforms:
        if item.get("type") == "scale":
            scale = [s * float(v) for s, v in zip(scale, item["scale"], strict=True)]
        elif item.get("type") == "translation":
            translation = [t + float(v) for t, v in zip(translation, item["translation"], strict=True)]
    return scale, translation


def _open_group(path: str) -> zarr.Group:
    """The Zarr group at ``path``, or an InputError saying what ``path`` is instead."""
    location = path if is_url(path) else str(local_path(path))
    local = None if is_url(path) else local_path(path)
    if local is not None and local.is_dir() and not any((local / f).is_file() for f in _ZARR_FILES):
        raise InputError(
            f"{path} is a folder but not a Zarr (no zarr.json or .zgroup); give an OME-Zarr or "
            "a TIFF, or convert the data with `emdiffuse convert`"
        )
    if local is not None and local.is_file():
        raise InputError(
            f"{path} is neither an OME-Zarr folder nor a .tif/.tiff file; give an OME-Zarr or "
            "a TIFF, or convert the data with `emdiffuse convert`"
        )
    try:
        node = zarr.open(location, mode="r")
    except Exception as error:  # zarr raises several types for "not a zarr"
        raise InputError(f"{path} is not a readable Zarr ({error}); give an OME-Zarr or a TIFF") from None
    if isinstance(node, zarr.Array):
        raise InputError(
            f"{path} is a plain Zarr array, not OME-Zarr; convert it with "
            "`emdiffuse convert IN OUT --voxel-size Z,Y,X`"
        )
    return node


def _spatial_axes(path: str, names: list[str], axes_meta: list[dict], shape) -> tuple[list[int], str | None]:
    """The indices of the spatial axes to keep, and why the image is no volume (a
    non-spatial axis longer than 1), if so. Singleton t / c axes are dropped."""
    keep, problem = [], None
    for i, (name, axis) in enumerate(zip(names, axes_meta, strict=True)):
        if name in "zyx" or axis.get("type") == "space":
            keep.append(i)
        elif shape[i] != 1 and problem is None:
            problem = (
                f"{path} has a non-spatial axis {name!r} of size {shape[i]}; "
                "split it into one image per channel/time point first"
            )
    return keep, problem


def open_ome_zarr(path: str, level: int) -> RawImage:
    """Level ``level`` of the OME-Zarr at ``path``, as it is (checked by the caller)."""
    node = _open_group(path)
    try:
        ms, _version = multiscales(node)
    except KeyError:
        raise InputError(
            f"{path} is a Zarr group without OME-Zarr 'multiscales' metadata; "
            "convert it with `emdiffuse convert IN OUT --voxel-size Z,Y,X`"
        ) from None
    datasets = ms["datasets"]
    if not 0 <= level < len(datasets):
        raise InputError(f"{path} has levels 0..{len(datasets) - 1}; level {level} does not exist")
    axes_meta = ms.get("axes", [{"name": a} for a in "zyx"[-len(node[datasets[0]["path"]].shape) :]])
    axes_meta = [a if isinstance(a, dict) else {"name": a} for a in axes_meta]
    names = [a["name"] for a in axes_meta]
    array_path = datasets[level]["path"]
    data = da.from_zarr(CheckedArray.wrap(node[array_path], f"{path.rstrip('/')}/{array_path}"))
    scale, translation = _transforms(datasets[level].get("coordinateTransformations", []), data.ndim)
    top_scale, top_translation = _transforms(ms.get("coordinateTransformations", []), data.ndim)
    scale = [s * t for s, t in zip(scale, top_scale, strict=True)]
    translation = [a * s + b for a, s, b in zip(top_translation, [1.0] * data.ndim, translation, strict=True)]
    transforms = [*datasets[level].get("coordinateTransformations", []), *ms.get("coordinateTransformations", [])]
    has_scale = any(t.get("type") == "scale" for t in transforms if isinstance(t, dict))
    keep, problem = _spatial_axes(path, names, axes_meta, data.shape)
    voxel: list[float | None] = []
    offset: list[float] = []
    for i in keep:
        factor = nm_per_unit(axes_meta[i].get("unit"))
        if factor is None or not has_scale:  # unknown size: the offset stays in voxels
            voxel.append(None)
            offset.append(translation[i] / scale[i] if scale[i] else 0.0)
        else:
            voxel.append(scale[i] * factor)
            offset.append(translation[i] * factor)
    why = "it has no scale" if not has_scale else "its axes have no unit"
    if problem is None:
        data = data[tuple(slice(None) if i in keep else 0 for i in range(data.ndim))]
        names = [names[i] for i in keep]
    return RawImage(data, "".join(names), voxel, offset, problem, why)
