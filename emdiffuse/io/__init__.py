"""Open and write volumes: OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3) and TIFF stacks.

Everything is lazy (dask arrays). Axis order zyx (2D: yx); voxel sizes and translations in nm.
Written images are OME-Zarr 0.5 (zarr v3): level arrays ``0``, ``1``, ... with a 2x mean
pyramid over the isotropic axes, metadata written last so a crashed write never looks complete.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from emdiffuse.errors import InputError

_UNIT_TO_NM = {
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1000.0,
    "micron": 1000.0,
    "um": 1000.0,
    "µm": 1000.0,  # micro sign
    "μm": 1000.0,  # greek mu
    "angstrom": 0.1,
    "å": 0.1,
    "picometer": 1e-3,
    "pm": 1e-3,
    "millimeter": 1e6,
    "mm": 1e6,
    "centimeter": 1e7,
    "cm": 1e7,
    "meter": 1e9,
    "m": 1e9,
    "inch": 2.54e7,
}
SPATIAL_AXES = {2: "yx", 3: "zyx"}
# A pixel coarser than this from bare TIFF resolution tags is a writer's print default
# (72, 100, 300 dpi), not a microscope's: treated as unknown.
_PRINT_RESOLUTION_NM = 10_000.0


def _nm_per_unit(unit) -> float | None:
    """Nanometres per ``unit`` (NGFF, OME and ImageJ spellings); None: absent or unknown."""
    if not unit:
        return None
    text = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    return _UNIT_TO_NM.get(text)


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
        import xarray as xr

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


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> Path:
    return Path(path[len("file://") :]) if path.startswith("file://") else Path(path)


def _exists(path: str) -> bool:
    if _is_url(path):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(path)
        return fs.exists(paths[0])
    return _local(path).exists()


def _check_dtype(dtype: np.dtype, path: str) -> None:
    if dtype.kind in "cbOSUV":
        raise InputError(
            f"{path} has dtype {dtype}, which is not an image intensity type; "
            "convert it to uint8, uint16 or float32"
        )


def _check_ndim(actual: int, wanted: int | None, path: str) -> None:
    if wanted is not None and actual != wanted:
        kind = {2: "a 2D image", 3: "a 3D volume"}
        raise InputError(
            f"{path} is {kind.get(actual, f'{actual}D')} but {kind.get(wanted, f'{wanted}D')} is "
            "needed here; pass the right input (or pick a task that fits it)"
        )


def _multiscales(group: zarr.Group) -> tuple[dict, str]:
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


@dataclass
class _Image:
    """What a file holds, before it is checked as a zyx / yx volume (``info`` shows it all).

    ``voxel`` and ``offset`` run along the spatial axes (zyx or yx); an unknown voxel size is
    None, and then its offset is in voxels. ``problem`` says why the image cannot be a volume
    (colour, a channel axis); ``data`` then keeps every axis.
    """

    data: da.Array
    axes: str
    voxel: list[float | None]
    offset: list[float]
    problem: str | None = None
    unknown_why: str = ""


class _CheckedArray(zarr.Array):
    """A zarr array whose reads turn an undecodable chunk into an ``InputError`` naming the
    array and the chunk, wherever the read runs (client, threads, Dask workers)."""

    label: str = ""
    show_keys: bool = True

    @classmethod
    def wrap(cls, array: zarr.Array, label: str, *, show_keys: bool = True) -> _CheckedArray:
        checked = cls(array._async_array)
        checked.label, checked.show_keys = label, show_keys
        return checked

    def __getitem__(self, selection):
        try:
            return super().__getitem__(selection)
        except (InputError, MemoryError):
            raise
        except Exception as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise  # the operating system failed, not the data
            damaged = self._damaged(selection, error)
            if damaged is None:
                raise
            raise damaged from None

    def _damaged(self, selection, error: Exception) -> InputError | None:
        """The first chunk under ``selection`` that fails on its own, as an InputError."""
        box = _box(selection, self.shape)
        if box is None:
            return None
        ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, self.chunks, strict=True)]
        for index in itertools.product(*ranges):
            region = tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape, strict=True)
            )
            try:
                super().__getitem__(region)
            except Exception:
                break
        else:
            return None
        where = f"chunk {index}"
        if self.show_keys:
            grid = self.shards or self.chunks
            shard = tuple(i * c // g for i, c, g in zip(index, self.chunks, grid, strict=True))
            where += f" (stored as {self.metadata.encode_chunk_key(shard)})"
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        return InputError(
            f"{self.label}: {where} cannot be decoded ({reason}); the input is damaged: "
            "restore it from a good copy (or re-export it) and run again"
        )


def _box(selection, shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """``selection`` (ints and unit-step slices) as (start, stop) per axis, else None."""
    items = selection if isinstance(selection, tuple) else (selection,)
    if len(items) > len(shape):
        return None
    box = []
    for item, n in zip(items, shape, strict=False):
        if isinstance(item, slice) and item.step in (None, 1):
            start, stop, _ = item.indices(n)
            box.append((start, max(start, stop)))
        elif isinstance(item, int | np.integer):
            i = int(item) % n if n else 0
            box.append((i, i + 1))
        else:
            return None
    return box + [(0, n) for n in shape[len(items) :]]


def _open_ome_zarr(path: str, level: int) -> _Image:
    location = path if _is_url(path) else str(_local(path))
    local = None if _is_url(path) else _local(path)
    zarr_files = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
    if local is not None and local.is_dir() and not any((local / f).is_file() for f in zarr_files):
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
    try:
        ms, _version = _multiscales(node)
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
    data = da.from_zarr(_CheckedArray.wrap(node[array_path], f"{path.rstrip('/')}/{array_path}"))
    scale, translation = _transforms(datasets[level].get("coordinateTransformations", []), data.ndim)
    top_scale, top_translation = _transforms(ms.get("coordinateTransformations", []), data.ndim)
    scale = [s * t for s, t in zip(scale, top_scale, strict=True)]
    translation = [a * s + b for a, s, b in zip(top_translation, [1.0] * data.ndim, translation, strict=True)]
    transforms = [*datasets[level].get("coordinateTransformations", []), *ms.get("coordinateTransformations", [])]
    has_scale = any(t.get("type") == "scale" for t in transforms if isinstance(t, dict))
    # Drop singleton non-spatial axes (t, c) so the pipeline sees zyx / yx.
    keep, problem = [], None
    for i, (name, axis) in enumerate(zip(names, axes_meta, strict=True)):
        if name in "zyx" or axis.get("type") == "space":
            keep.append(i)
        elif data.shape[i] != 1 and problem is None:
            problem = (
                f"{path} has a non-spatial axis {name!r} of size {data.shape[i]}; "
                "split it into one image per channel/time point first"
            )
    voxel: list[float | None] = []
    offset: list[float] = []
    for i in keep:
        factor = _nm_per_unit(axes_meta[i].get("unit"))
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
    return _Image(data, "".join(names), voxel, offset, problem, why)


@contextlib.contextmanager
def _tifffile_log():
    """Collect what tifffile logs while parsing: it reports a damaged file as a warning and
    reads on (a truncated stack becomes fewer pages), so a warning here is a damaged file."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(" ".join(record.getMessage().split()))

    logger = logging.getLogger("tifffile")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _open_tiff(path: str) -> _Image:
    """A TIFF by tifffile's own reading: its series (ImageJ, OME, shaped, generic) with axes,
    read lazily page by page (tifffile's zarr store); a damaged file is an InputError."""
    import tifffile

    damaged = f"{path} is a truncated or corrupt TIFF"
    with _tifffile_log() as log:
        try:
            tif = tifffile.TiffFile(str(_local(path)))
        except Exception as error:
            raise InputError(f"{damaged} ({' '.join(str(error).split())})") from None
        with tif:
            try:
                series = _tiff_series(tif, path)
                _check_tiff_extent(tif, series, damaged)
                store = series.aszarr(level=0)
                voxel = _tiff_voxel_size(tif, series)
            except Exception as error:
                if log or not isinstance(error, InputError):
                    reason = log[0] if log else " ".join(f"{type(error).__name__}: {error}".split())
                    raise InputError(f"{damaged} ({reason})") from None
                raise
            if log:
                raise InputError(f"{damaged} (tifffile: {log[0]})")
            photometric = int(series.keyframe.photometric)
    array = _CheckedArray.wrap(zarr.open(store, mode="r"), path, show_keys=False)
    return _tiff_image(path, da.from_zarr(array), series.axes, photometric, voxel)


def _tiff_series(tif, path: str):
    """The file's one image series; a stack written page by page (one series per page, as
    tifffile's ``contiguous=False`` writes) becomes one series of those pages."""
    import tifffile

    series = tif.series
    if not series:
        raise InputError(f"{path} is a truncated or corrupt TIFF (it holds no image)")
    if len(series) == 1:
        return series[0]
    first = series[0]
    if all(
        s.kind in ("shaped", "generic", "uniform")
        and len(s.pages) == 1
        and (s.shape, s.dtype, s.axes) == (first.shape, first.dtype, first.axes)
        for s in series
    ):
        pages = [s.pages[0] for s in series]
        shape = (len(series), *first.shape)
        return tifffile.TiffPageSeries(pages, shape, first.dtype, "I" + first.axes, parent=tif, kind="generic")
    kinds = ", ".join(sorted({f"{s.shape} {s.dtype}" for s in series}))
    raise InputError(
        f"{path} holds {len(series)} images ({kinds}), not one stack of equal pages; "
        "save one stack (or one image) per file"
    )


def _check_tiff_extent(tif, series, damaged: str) -> None:
    """Refuse pages that are missing or whose data run past the end of the file."""
    size = tif.filehandle.size
    pages = list(series.pages)
    if series.dataoffset is not None:  # contiguous: one block of known length
        end = series.dataoffset + series.nbytes
    else:
        end = max(
            (o + n for p in pages if p is not None for o, n in zip(p.dataoffsets, p.databytecounts, strict=False)),
            default=0,
        )
    if any(p is None for p in pages):
        raise InputError(f"{damaged} (pages are missing)")
    if end > size:
        raise InputError(f"{damaged} (its image data need {end} bytes, the file has {size})")


_TIFF_AXIS_NAMES = {"C": "channel", "T": "time", "S": "sample", "E": "lambda", "R": "tile", "H": "lifetime"}
_COLOUR = {2: "an RGB colour", 3: "a palette (indexed colour)", 5: "a CMYK colour", 6: "a YCbCr (RGB) colour"}


def _tiff_image(path: str, data: da.Array, axes: str, photometric: int, voxel: dict) -> _Image:
    """Keep y, x and z (Z; or I, Q: a sequence of pages) of a tifffile series; refuse colour
    and real channel/time axes as the OME-Zarr path does; drop other singleton axes."""
    sizes = dict(zip(axes, data.shape, strict=True))
    problem = None
    if photometric in _COLOUR or sizes.get("S", 1) > 1:
        what = _COLOUR.get(photometric, "a multi-sample")
        planar = " (tifffile.imwrite writes 3 or 4 planes as RGB unless given photometric='minisblack')"
        problem = (
            f"{path} is {what} image ({sizes.get('S', 1)} samples per pixel, TIFF axes {axes}); "
            "EM input is one grey value per voxel: convert it to grey (8 or 16 bit) first"
            + (planar if axes.startswith("S") else "")
        )
    keep = [i for i, a in enumerate(axes) if a in "ZYX" or (a in "IQ" and data.shape[i] > 1)]
    for i, a in enumerate(axes):
        if i not in keep and data.shape[i] > 1 and problem is None:
            problem = (
                f"{path} has a {_TIFF_AXIS_NAMES.get(a, 'non-spatial')} axis ({a}) of size "
                f"{data.shape[i]} (TIFF axes {axes}); split it into one image per channel/time "
                "point first (z-slices are ImageJ axes ZYX: tifffile metadata={'axes': 'ZYX'})"
            )
    if problem is not None:
        spatial = [a.lower() for a in axes if a in "ZYX"]
        return _Image(data, axes.lower(), [voxel.get(a) for a in spatial], [0.0] * len(spatial), problem)
    stacking = sum(axes[i] in "ZIQ" for i in keep)
    names = "".join("z" if axes[i] in "ZIQ" and stacking == 1 else axes[i].lower() for i in keep)
    data = data[tuple(slice(None) if i in keep else 0 for i in range(data.ndim))]
    known = [a for a in "zyx" if a in voxel]
    why = f"it records a pixel size for {', '.join(known)} only" if known else "it records no pixel size"
    return _Image(data, names, [voxel.get(a) for a in names], [0.0] * len(keep), None, why)


def _tiff_voxel_size(tif, series) -> dict[str, float]:
    """nm per voxel by axis (z, y, x) from OME-XML ``PhysicalSize*``, ImageJ ``unit`` and
    ``spacing``, or resolution tags in cm / inch; absent axes are unknown."""
    if tif.is_ome and tif.ome_metadata:
        return _ome_tiff_sizes(tif.ome_metadata)
    page = series.keyframe
    tags = page.tags
    ij = tif.imagej_metadata or {}
    if ij and _nm_per_unit(ij.get("unit")):
        factor = _nm_per_unit(ij.get("unit"))
        sizes = _per_pixel(tags, factor)
        if float(ij.get("spacing", 0) or 0) > 0:
            sizes["z"] = float(ij["spacing"]) * factor
        return sizes
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    factor = {2: 2.54e7, 3: 1e7}.get(unit)  # inch, centimetre (1: none)
    sizes = _per_pixel(tags, factor) if factor else {}
    return {a: v for a, v in sizes.items() if v <= _PRINT_RESOLUTION_NM}


def _per_pixel(tags, factor: float) -> dict[str, float]:
    """nm per pixel along y and x from the X/YResolution tags (pixels per unit)."""
    sizes = {}
    for axis, name in (("x", "XResolution"), ("y", "YResolution")):
        if name in tags:
            numerator, denominator = tags[name].value
            if numerator > 0 and denominator > 0:
                sizes[axis] = factor * denominator / numerator
    return sizes


def _ome_tiff_sizes(xml: str) -> dict[str, float]:
    """``PhysicalSizeX/Y/Z`` of the first OME image (the one read), in nm (default unit µm)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = [e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return {}
    element = pixels[0]
    sizes = {}
    for axis in "zyx":
        value = element.get(f"PhysicalSize{axis.upper()}")
        factor = _nm_per_unit(element.get(f"PhysicalSize{axis.upper()}Unit", "µm"))
        try:
            if value is not None and factor is not None and float(value) > 0:
                sizes[axis] = float(value) * factor
        except ValueError:
            continue
    return sizes


def _check_volume(image: _Image, path: str, ndim: int | None = None) -> None:
    """Refuse what cannot be enhanced: colour, extra axes, odd dtypes, empty, wrong ndim."""
    if image.problem:
        raise InputError(image.problem)
    data = image.data
    _check_dtype(data.dtype, path)
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


def _open_image(path: str, level: int = 0) -> _Image:
    """An OME-Zarr level or a TIFF as it is, for :func:`open_volume` and :func:`describe`."""
    if not _exists(path):
        raise InputError(f"{path} does not exist; check the path")
    if _local(path).name.lower().endswith((".tif", ".tiff")):
        return _open_tiff(path)
    return _open_ome_zarr(path, level)


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
    image = _open_image(path, level)
    _check_volume(image, path, ndim)
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


# ---- output safety: what emdiffuse wrote, and what a run must not touch ----------------------
# The mark of the folders emdiffuse fills (train, synth, demo).
OUTPUT_MARKER = Path(".emdiffuse") / "output.json"
OUTPUT_KINDS = {
    "image": "an OME-Zarr image",
    "train": "a training run",
    "synth": "a synth folder",
    "demo": "an earlier demo folder",
    "checkpoint": "a checkpoint",
}
# Outputs that are folders a command fills: their parents are made, an empty one is taken.
_FILLED_FOLDERS = ("train", "synth", "demo")


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_our_checkpoint(path: Path) -> bool:
    """A .safetensors file whose header names the emdiffuse checkpoint format."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 1 << 26:
                return False
            header = json.loads(handle.read(size))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("emdiffuse-checkpoint")


def written_by_emdiffuse(path: str | Path) -> str | None:
    """The kind (a key of ``OUTPUT_KINDS``) of the emdiffuse output at ``path``, or None.

    Recognised by what emdiffuse writes: the folder marker ``.emdiffuse/output.json``; an
    image's run record ``.emdiffuse/run.json`` or the ``emdiffuse`` attributes of its
    ``zarr.json``; a checkpoint's format tag (its ``.json`` sidecar: the model config keys);
    and, from before the marker, a demo's ``.emdiffuse-demo`` and a training run's settings.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return "checkpoint" if _is_our_checkpoint(path) else None
        config = _json(path) if path.suffix == ".json" else None
        return "checkpoint" if config is not None and {"variant", "unet"} <= set(config) else None
    if not path.is_dir():
        return None
    marker = _json(path / OUTPUT_MARKER) or {}
    if marker.get("kind") in OUTPUT_KINDS:
        return marker["kind"]
    if (path / ".emdiffuse" / "run.json").is_file():
        return "image"
    attributes = (_json(path / "zarr.json") or {}).get("attributes")
    if isinstance(attributes, dict) and isinstance(attributes.get("emdiffuse"), dict):
        return "image"
    if (path / ".emdiffuse-demo").is_file():
        return "demo"
    settings = _json(path / "settings.json") or {}
    if {"task", "data", "patch"} <= set(settings) and (
        (path / "model.safetensors").is_file() or (path / "checkpoints").is_dir()
    ):
        return "train"
    return None


def _holdings(path: Path, limit: int = 3) -> str:
    """What is at ``path``, briefly: ``thesis.txt, data/, ...`` (or ``a file``)."""
    if not path.is_dir():
        return "a file"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def _not_ours(
    path_out, found: str | None, kind: str, resumable: bool, name: str = "output"
) -> str:
    """The refusal of an existing ``path_out`` that is not an emdiffuse output of ``kind``."""
    wanted = OUTPUT_KINDS[kind]
    options = "--overwrite and --resume act" if resumable else "--overwrite acts"
    if found is None:
        return (
            f"{name} {path_out} exists and was not written by emdiffuse, so it is not {wanted} "
            f"(it holds {_holdings(Path(path_out))}); {options} only on emdiffuse's own outputs: "
            "choose another output"
        )
    return (
        f"{name} {path_out} is {OUTPUT_KINDS[found]} written by emdiffuse, not {wanted}; "
        f"{options} only on {wanted}: choose another output"
    )


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def refuse_output(
    path_out: str | Path,
    path_in: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reads: Sequence[tuple[str, str | Path | None]] = (),
    kind: str = "image",
    resumable: bool | None = None,
    name: str = "output",
) -> None:
    """Refuse an output that would harm data, before anything is written.

    Refused: an output that is, holds or lies inside a path the run reads (``path_in``, the
    input, and ``reads``: ``(label, path)`` pairs such as ``("model", ckpt)``); an existing
    output without ``overwrite``/``resume``; and, whatever the flags, an existing output
    that is not an emdiffuse output of ``kind`` (:func:`written_by_emdiffuse`) — an empty
    folder excepted. ``resumable`` (default: ``resume`` is an option here, true for images)
    words the messages; ``name`` names the output in them.
    """
    out = str(path_out)
    if _is_url(out):
        return
    resumable = kind in ("image", "train") if resumable is None else resumable
    out_path = _local(out).resolve()
    sources = [("input", path_in), *reads]
    for label, read in sources:
        if read is None or _is_url(str(read)):
            continue
        read_path = _local(str(read)).resolve()
        if _same(out_path, read_path):
            raise InputError(
                f"{name} {path_out} is the {label} {read}, an input of this run; "
                "choose another output"
            )
        if read_path in out_path.parents:
            raise InputError(
                f"{name} {path_out} is inside the {label} {read}; choose an output elsewhere"
            )
        if out_path in read_path.parents:
            raise InputError(
                f"{name} {path_out} contains the {label} {read}; choose an output elsewhere"
            )
    folder = kind != "checkpoint"
    if out_path.exists():
        empty = out_path.is_dir() and not any(out_path.iterdir())
        if folder and not out_path.is_dir():
            raise InputError(f"{name} {path_out} is a file, not a folder; choose another output")
        found = None if empty else written_by_emdiffuse(out_path)
        if not empty and found != kind:
            raise InputError(_not_ours(path_out, found, kind, resumable, name))
        if not (overwrite or resume or (empty and kind in _FILLED_FOLDERS)):
            again = " or --resume to continue it" if resumable else ""
            what = "an empty folder" if empty else f"{OUTPUT_KINDS[kind]} written by emdiffuse"
            raise InputError(
                f"{name} {path_out} exists ({what}); pass --overwrite to replace it{again}"
            )
    parent = out_path.parent
    if kind != "image":  # made with its parents: check the nearest folder that exists
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise InputError(
            f"the folder {parent} for {name} {path_out} does not exist; create it first"
        )
    if not parent.is_dir():
        raise InputError(
            f"{parent} is a file, not a folder, so {name} {path_out} cannot go there; "
            "choose another output"
        )
    _check_writable(out_path if out_path.is_dir() else parent, path_out)


def remove_output(path: str | Path, kind: str) -> None:
    """Delete an earlier output of ``kind`` at ``path`` (nothing when absent). Only what
    emdiffuse wrote, or an empty folder, is ever deleted: anything else raises InputError."""
    path = _local(str(path))
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
        return
    found = written_by_emdiffuse(path)
    if found != kind or path.is_symlink():
        raise InputError(_not_ours(path, found, kind, resumable=False))
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def make_output_folder(path: str | Path, kind: str, *, replace: bool = False) -> Path:
    """Create the folder ``path`` (and its parents) for an output of ``kind`` and mark it as
    emdiffuse's (``.emdiffuse/output.json``); ``replace`` first removes an earlier output of
    that kind (:func:`remove_output`). An existing folder is kept and marked."""
    from emdiffuse import __version__

    path = Path(path)
    if replace:
        remove_output(path, kind)
    marker = path / OUTPUT_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"kind": kind, "emdiffuse": __version__}) + "\n")
    return path


def _check_writable(folder: Path, path_out) -> None:
    """Refuse an output whose folder cannot take new entries (read-only file system, no
    permission, a virtual file system such as /proc): try to make and remove an empty folder
    there, which catches what ``os.access`` misses (it says yes to root everywhere)."""
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".emdiffuse-write-test-", dir=folder)
    except OSError as error:
        raise InputError(
            f"cannot write output {path_out}: {folder} is not writable ({error.strerror or error}); "
            "choose an output in a writable folder"
        ) from None
    Path(probe).rmdir()


def _ngff_axes(axes: str) -> list[dict]:
    return [{"name": a, "type": "space", "unit": "nanometer"} for a in axes]


def create_image(
    path: str | Path,
    *,
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    voxel_size: Sequence[float],
    axes: str = "zyx",
    translation: Sequence[float] | None = None,
    overwrite: bool = False,
    name: str = "image",
) -> zarr.Array:
    """Create an OME-Zarr 0.5 group with an empty level-0 array ``0`` for region writes.

    The multiscales metadata is written by :func:`finalize_image`, so a half-written image
    is never mistaken for a finished one. Child images (``uncertainty/``) of an existing group
    are kept; ``overwrite`` replaces this path only, and only an image emdiffuse wrote.
    """
    path = str(path)
    local = _local(path)
    if local.exists():
        if not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it")
        remove_output(local, "image")  # only an image emdiffuse wrote
    parse_voxel_size(list(voxel_size), len(shape))
    group = zarr.open_group(str(local), mode="a", zarr_format=3)
    group.attrs["emdiffuse"] = {
        "name": name,
        "voxel_size_nm": [float(v) for v in voxel_size],
        "translation_nm": [float(t) for t in (translation or [0.0] * len(shape))],
        "axes": axes,
        "complete": False,
    }
    chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, shape, strict=True))
    return group.create_array(
        "0",
        shape=tuple(int(s) for s in shape),
        dtype=np.dtype(dtype),
        chunks=chunks,
        fill_value=0,
        dimension_names=list(axes),
        overwrite=True,
    )


def pyramid_factors(
    shape: Sequence[int], voxel_size: Sequence[float], chunks: Sequence[int] | None = None
) -> list[tuple[int, ...]]:
    """Per-level downsampling factors (relative to the previous level).

    Axes finer than the coarsest axis by about 2x or more are halved first (anisotropic
    volumes catch up); isotropic volumes halve every axis. An axis thinner than 16 voxels is
    not halved; the pyramid stops when the largest halved axis would drop below 16 voxels.
    """
    levels: list[tuple[int, ...]] = []
    shape = list(shape)
    voxel = list(voxel_size)
    while True:
        coarsest = max(voxel)
        factors = [2 if v * 2 <= coarsest * 1.5 else 1 for v in voxel]
        if all(f == 1 for f in factors):
            factors = [2 for _ in voxel]
        factors = [f if s // f >= 8 else 1 for s, f in zip(shape, factors, strict=True)]
        halved = [s // 2 for s, f in zip(shape, factors, strict=True) if f == 2]
        if not halved or max(halved) < 16:
            break
        levels.append(tuple(factors))
        shape = [s // f for s, f in zip(shape, factors, strict=True)]
        voxel = [v * f for v, f in zip(voxel, factors, strict=True)]
    return levels


def _downsample(data: da.Array, factors: Sequence[int], dtype: np.dtype) -> da.Array:
    trimmed = data[tuple(slice(0, (n // f) * f) for n, f in zip(data.shape, factors, strict=True))]
    mean = da.coarsen(np.mean, trimmed.astype(np.float32), dict(enumerate(factors)), trim_excess=True)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        mean = da.clip(da.round(mean), info.min, info.max)
    return mean.astype(dtype)


def finalize_image(
    path: str | Path,
    *,
    levels: int | None = None,
    voxel_size: Sequence[float] | None = None,
    axes: str | None = None,
    translation: Sequence[float] | None = None,
    scheduler=None,
) -> None:
    """Build levels 1..n from the written level 0, region by region, then write the metadata.

    ``levels`` caps the number of extra levels (None: until an axis drops below 32 voxels).
    Mean downsampling shifts each level's origin by half its voxel, recorded as a translation.
    """
    path = str(path)
    group = zarr.open_group(str(_local(path)), mode="a")
    info = group.attrs.get("emdiffuse", {})
    voxel = [float(v) for v in (voxel_size or info.get("voxel_size_nm"))]
    axes = axes or info.get("axes") or SPATIAL_AXES[len(voxel)]
    offset = [float(t) for t in (translation or info.get("translation_nm") or [0.0] * len(voxel))]
    base = group["0"]
    plan = pyramid_factors(base.shape, voxel, base.chunks)
    if levels is not None:
        plan = plan[: max(0, int(levels))]
    datasets = [_dataset("0", voxel, offset)]
    previous = da.from_zarr(base)
    level_voxel = list(voxel)
    level_offset = list(offset)
    for i, factors in enumerate(plan, start=1):
        down = _downsample(previous, factors, base.dtype)
        target = group.create_array(
            str(i),
            shape=down.shape,
            dtype=base.dtype,
            chunks=tuple(min(c, s) for c, s in zip(base.chunks, down.shape, strict=True)),
            fill_value=0,
            dimension_names=list(axes),
            overwrite=True,
        )
        down = down.rechunk(target.chunks)
        da.store(down, target, lock=False, compute=True, scheduler=scheduler or "threads")
        level_offset = [o + (f - 1) * v / 2 for o, f, v in zip(level_offset, factors, level_voxel, strict=True)]
        level_voxel = [v * f for v, f in zip(level_voxel, factors, strict=True)]
        datasets.append(_dataset(str(i), level_voxel, level_offset))
        previous = da.from_zarr(target)
    multiscale = {
        "name": info.get("name", "image"),
        "axes": _ngff_axes(axes),
        "datasets": datasets,
        "type": "mean",
    }
    info = dict(info)
    info["complete"] = True
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale]}, "emdiffuse": info})


def _dataset(name: str, voxel: Sequence[float], offset: Sequence[float]) -> dict:
    transforms: list[dict] = [{"type": "scale", "scale": [float(v) for v in voxel]}]
    if any(o != 0 for o in offset):
        transforms.append({"type": "translation", "translation": [float(o) for o in offset]})
    return {"path": name, "coordinateTransformations": transforms}


def write_image(
    data: da.Array | np.ndarray,
    path: str | Path,
    *,
    voxel_size: Sequence[float],
    chunks: Sequence[int] | None = None,
    axes: str | None = None,
    translation: Sequence[float] | None = None,
    overwrite: bool = False,
    levels: int | None = None,
    name: str = "image",
    compute: bool = True,
) -> str:
    """Write a (dask) array as multiscale OME-Zarr 0.5, chunk region by chunk region."""
    data = da.asarray(data)
    _check_dtype(data.dtype, str(path))
    axes = axes or SPATIAL_AXES[data.ndim]
    if chunks is None:
        chunks = tuple(min(s, c) for s, c in zip(data.shape, (64, 256, 256)[-data.ndim :], strict=True))
    target = create_image(
        path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        voxel_size=voxel_size,
        axes=axes,
        translation=translation,
        overwrite=overwrite,
        name=name,
    )
    try:
        da.store(data.rechunk(target.chunks), target, lock=False, compute=compute)
        finalize_image(path, levels=levels, voxel_size=voxel_size, axes=axes, translation=translation)
    except InputError:  # the data proved unreadable (a damaged chunk): remove what this made
        if not _is_url(str(path)):
            shutil.rmtree(_local(str(path)), ignore_errors=True)
        raise
    return str(path)


def describe(path: str | Path) -> dict:
    """Facts about any readable image for ``emdiffuse info``: shape, dtype, chunks, voxel
    size (None where unknown), levels, child images, and why it cannot be enhanced (if so)."""
    path = str(path)
    image = _open_image(path)
    try:
        _check_volume(image, path)
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
    local = _local(path)
    if local.is_dir():
        group = zarr.open_group(str(local), mode="r")
        ms, version = _multiscales(group)
        facts["ngff_version"] = version
        for i in range(len(ms["datasets"])):
            level = _open_ome_zarr(path, i)
            facts["levels"].append(
                {"level": i, "shape": tuple(level.data.shape), "voxel_size_nm": tuple(level.voxel)}
            )
        from emdiffuse.pipeline.run_record import RECORD_DIR

        with warnings.catch_warnings():
            # zarr warns about each folder that is not a Zarr node, our run record among them
            warnings.filterwarnings("ignore", f"Object at {re.escape(RECORD_DIR)} is not recognized")
            children = list(group.groups())
        for child_name, child in children:
            try:
                _multiscales(child)
                facts["children"].append(child_name)
            except KeyError:
                continue
    return facts
