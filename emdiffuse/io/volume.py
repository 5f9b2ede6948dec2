"""Volumes in: :func:`open_volume` opens an OME-Zarr level, a TIFF stack, an HDF5 dataset,
an N5 dataset, a neuroglancer precomputed scale or an MRC file lazily as a :class:`Volume`
(dask data, axes zyx / yx, voxel size and translation in nm), after checking that it can be
enhanced; :func:`check_finite` refuses NaN and inf. Which reader: :func:`input_format`
(prefix, suffix, then what the location holds); :func:`input_identity` is the content
identity that caches of opened inputs are keyed on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io.image import RawImage, check_dtype
from emdiffuse.io.ome_zarr import open_ome_zarr
from emdiffuse.io.paths import exists, file_identity, input_format
from emdiffuse.io.tiff import open_tiff

FORMATS = {
    "ome-zarr": "OME-Zarr",
    "tiff": "TIFF",
    "hdf5": "HDF5",
    "n5": "N5",
    "precomputed": "neuroglancer precomputed",
    "mrc": "MRC",
}


@dataclass
class Volume:
    """A lazily opened volume: dask data, axes, voxel size and translation in nm."""

    data: da.Array
    axes: str
    voxel_size: tuple[float, ...]
    translation: tuple[float, ...]
    path: str
    level: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def to_xarray(self):
        """The volume as an ``xarray.DataArray`` with physical coordinates in nm."""
        import xarray as xr  # imported here: ~1 s, and only this method needs it

        coords = {
            axis: (axis, offset + size * np.arange(n), {"units": "nm"})
            for axis, n, size, offset in zip(
                self.axes, self.shape, self.voxel_size, self.translation, strict=True
            )
        }
        return xr.DataArray(
            self.data,
            dims=tuple(self.axes),
            coords=coords,
            name=Path(self.path.rstrip("/")).name,
            attrs={"voxel_size_nm": self.voxel_size, "source": self.path, "level": self.level},
        )


def parse_voxel_size(text: str | float | Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """Parse ``"8,8,8"`` / ``8`` / a sequence into a positive zyx voxel size in nm."""
    if isinstance(text, str):
        try:
            values = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise InputError(
                f"voxel size {text!r} is not a number list; give it as Z,Y,X in nm, e.g. 30,8,8"
            ) from None
    elif isinstance(text, int | float):
        values = [float(text)]
    else:
        values = [float(v) for v in text]
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim:
        raise InputError(f"voxel size {text!r} has {len(values)} values but the image has {ndim} axes")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(
            f"voxel size {text!r} must be positive numbers; pass --voxel-size as nm per voxel, "
            "Z,Y,X (e.g. 30,8,8)"
        )
    return tuple(values)


def _check_ndim(actual: int, wanted: int | None, path: str) -> None:
    if wanted is not None and actual != wanted:
        kind = {2: "a 2D image", 3: "a 3D volume"}
        raise InputError(
            f"{path} is {kind.get(actual, f'{actual}D')} but {kind.get(wanted, f'{wanted}D')} is "
            "needed here; pass the right input (or pick a task that fits it)"
        )



def check_volume(image: RawImage, path: str, ndim: int | None = None) -> None:
    """Refuse what cannot be enhanced: colour, extra axes, odd dtypes, empty, wrong ndim."""
    if image.problem:
        raise InputError(image.problem)
    data = image.data
    check_dtype(data.dtype, path)
    if data.ndim not in (2, 3):
        axes = "axis" if data.ndim == 1 else "axes"
        raise InputError(
            f"{path} has {data.ndim} {axes} ({data.shape}); a 2D image (yx) or a 3D volume (zyx) "
            "is needed: give one of those"
        )
    _check_ndim(data.ndim, ndim, path)
    if any(n == 0 for n in data.shape):
        raise InputError(
            f"{path} has an axis of size zero (shape {tuple(data.shape)}), so it holds no voxels; "
            "give a non-empty image"
        )


def _reader(kind: str):
    """The ``open_*(path, level) -> RawImage`` of a format (imported when first needed: the
    optional formats need the ``formats`` extra)."""
    if kind == "hdf5":
        from emdiffuse.io.hdf5 import open_hdf5

        return open_hdf5
    if kind == "n5":
        from emdiffuse.io.n5 import open_n5

        return open_n5
    if kind == "precomputed":
        from emdiffuse.io.precomputed import open_precomputed

        return open_precomputed
    if kind == "mrc":
        from emdiffuse.io.mrc import open_mrc

        return open_mrc
    raise KeyError(kind)


def open_image(path: str, level: int = 0) -> RawImage:
    """Any readable image as it is (level ``level`` of a multiscale one), for
    :func:`open_volume` and :func:`describe`."""
    kind = input_format(path)
    if kind in ("ome-zarr", "tiff"):
        if not exists(path):
            raise InputError(f"{path} does not exist; check the path")
        if kind == "tiff":
            if level != 0:
                raise InputError(f"{path} has one level (0) only; level {level} does not exist")
            image = open_tiff(path)
        else:
            image = open_ome_zarr(path, level)
    else:  # the reader checks existence itself: an object store has no folders to look at
        image = _reader(kind)(path, level)
    image.format = image.format or FORMATS[kind]
    return image


def input_identity(path: str, level: int = 0) -> tuple | None:
    """What identifies the content of an HDF5, N5, precomputed or MRC input as far as an
    opened one depends on it (the file's size and modification time, or the bytes of its
    metadata); None for OME-Zarr and TIFF, whose identity the pipeline's own cache takes."""
    kind = input_format(path)
    if kind in ("hdf5", "mrc"):
        return (kind, *file_identity(path))
    if kind == "n5":
        from emdiffuse.io.n5 import identity

        return identity(path, level)
    if kind == "precomputed":
        from emdiffuse.io.precomputed import identity

        return identity(path, level)
    return None


def open_volume(
    path: str | Path,
    *,
    level: int = 0,
    voxel_size: str | float | Sequence[float] | None = None,
    ndim: int | None = None,
) -> Volume:
    """Open an OME-Zarr (local path or fsspec URL, any level) or a TIFF stack lazily.

    ``voxel_size`` (nm, zyx) overrides / supplies what the metadata lacks; ``ndim`` (2 or 3)
    is checked. Raises ``InputError`` with a one-line reason for bad input.
    """
    path = str(path)
    image = open_image(path, level)
    check_volume(image, path, ndim)
    data, voxel, offset = image.data, image.voxel, image.offset
    if voxel_size is not None:
        given = parse_voxel_size(voxel_size, data.ndim)
        offset = [o * g if v is None else o for o, g, v in zip(offset, given, voxel, strict=True)]
        voxel = list(given)
    if any(v is None for v in voxel):
        example = "Z,Y,X" if data.ndim == 3 else "Y,X"
        raise InputError(
            f"{path} does not record its voxel size ({image.unknown_why}); "
            f"pass --voxel-size {example} (nm)"
        )
    if not all(math.isfinite(v) and v > 0 for v in voxel):
        raise InputError(
            f"{path} records voxel size {voxel}, which is not positive; pass --voxel-size Z,Y,X (nm)"
        )
    return Volume(data, image.axes, tuple(float(v) for v in voxel), tuple(float(t) for t in offset), path, level)


def check_finite(volume: Volume, *, max_chunks: int = 256) -> None:
    """Raise ``InputError`` if float data holds NaN or inf.

    Scans every chunk of volumes with at most ``max_chunks`` chunks, else an evenly spaced
    sample of ``max_chunks`` chunks (the message says which).
    """
    if volume.dtype.kind != "f":
        return
    data = volume.data
    blocks = list(np.ndindex(*data.numblocks))
    sampled = len(blocks) > max_chunks
    if sampled:
        step = len(blocks) / max_chunks
        blocks = [blocks[int(i * step)] for i in range(max_chunks)]
    checks = [da.isfinite(data.blocks[b]).all() for b in blocks]
    ok = da.compute(*checks, scheduler="threads")
    if not all(bool(v) for v in ok):
        where = "in a sampled chunk" if sampled else ""
        raise InputError(
            f"{volume.path} contains NaN or inf values {where}".rstrip()
            + "; replace them (e.g. with the background value) first"
        )
