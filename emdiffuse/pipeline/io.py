"""Open and write volumes: OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3) and TIFF stacks.

Everything is lazy (dask arrays). Axis order zyx (2D: yx); voxel sizes and translations in nm.
Written images are OME-Zarr 0.5 (zarr v3): level arrays ``0``, ``1``, ... with a 2x mean
pyramid over the isotropic axes, metadata written last so a crashed write never looks complete.
"""

from __future__ import annotations

import math
import shutil
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
    "µm": 1000.0,
    "angstrom": 0.1,
    "millimeter": 1e6,
    "picometer": 1e-3,
}
SPATIAL_AXES = {2: "yx", 3: "zyx"}


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


def _open_ome_zarr(path: str, level: int) -> tuple[da.Array, str, list[float] | None, list[float]]:
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
    names = [a["name"] if isinstance(a, dict) else a for a in axes_meta]
    array = node[datasets[level]["path"]]
    data = da.from_zarr(array)
    scale, translation = _transforms(datasets[level].get("coordinateTransformations", []), data.ndim)
    top_scale, top_translation = _transforms(ms.get("coordinateTransformations", []), data.ndim)
    scale = [s * t for s, t in zip(scale, top_scale, strict=True)]
    translation = [a * s + b for a, s, b in zip(top_translation, [1.0] * data.ndim, translation, strict=True)]
    # Drop singleton non-spatial axes (t, c) so the pipeline sees zyx / yx.
    keep = []
    for i, (name, axis) in enumerate(zip(names, axes_meta, strict=True)):
        kind = axis.get("type") if isinstance(axis, dict) else None
        if name in "zyx" or kind == "space":
            keep.append(i)
        elif data.shape[i] != 1:
            raise InputError(
                f"{path} has a non-spatial axis {name!r} of size {data.shape[i]}; "
                "split it into one image per channel/time point first"
            )
    factors = []
    for i in keep:
        axis = axes_meta[i]
        unit = (axis.get("unit") if isinstance(axis, dict) else None) or "nanometer"
        factors.append(_UNIT_TO_NM.get(str(unit).lower(), 1.0))
    index = tuple(slice(None) if i in keep else 0 for i in range(data.ndim))
    data = data[index]
    axes = "".join(names[i] for i in keep)
    voxel = [scale[i] * f for i, f in zip(keep, factors, strict=True)]
    offset = [translation[i] * f for i, f in zip(keep, factors, strict=True)]
    transforms = [*datasets[level].get("coordinateTransformations", []), *ms.get("coordinateTransformations", [])]
    if not any(t.get("type") == "scale" for t in transforms if isinstance(t, dict)):
        voxel = None  # no scale recorded: the voxel size is unknown, not 1 nm
    return data, axes, voxel, offset


def _open_tiff(path: str) -> tuple[da.Array, str, list[float] | None, list[float]]:
    import tifffile

    try:
        tif = tifffile.TiffFile(str(_local(path)))
    except Exception as error:
        raise InputError(f"{path} is not a readable TIFF ({error})") from None
    with tif:
        series = tif.series[0]
        voxel = _tiff_voxel_size(tif, series.ndim)
    store = tifffile.imread(str(_local(path)), aszarr=True)
    data = da.from_zarr(zarr.open(store, mode="r"))
    data = data.squeeze() if data.ndim > 3 else data
    return data, SPATIAL_AXES.get(data.ndim, "zyx"[-data.ndim :]), voxel, [0.0] * data.ndim


def _tiff_voxel_size(tif, ndim: int) -> list[float] | None:
    """Voxel size in nm from ImageJ metadata / resolution tags, or None when absent."""
    try:
        page = tif.pages[0]
        tags = page.tags
        if "XResolution" not in tags or "ResolutionUnit" not in tags:
            return None
        unit_tag = tags["ResolutionUnit"].value
        ij = tif.imagej_metadata or {}
        unit = str(ij.get("unit", "")).replace("\\u00B5", "µ").lower()
        if unit in ("micron", "um", "µm", "micrometer"):
            factor = 1000.0
        elif unit in ("nm", "nanometer"):
            factor = 1.0
        elif int(unit_tag) == 3:  # centimetre
            factor = 1e7
        else:
            return None
        xres = tags["XResolution"].value
        yres = tags["YResolution"].value
        x = factor * xres[1] / xres[0]
        y = factor * yres[1] / yres[0]
        z = float(ij.get("spacing", 0.0)) * factor
        if ndim == 2:
            return [y, x]
        return [z if z > 0 else None, y, x] if z > 0 else None
    except Exception:
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
    if not _exists(path):
        raise InputError(f"{path} does not exist; check the path")
    suffix = _local(path).name.lower()
    if suffix.endswith((".tif", ".tiff")):
        data, axes, voxel, offset = _open_tiff(path)
    else:
        data, axes, voxel, offset = _open_ome_zarr(path, level)
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
    if voxel_size is not None:
        voxel = list(parse_voxel_size(voxel_size, data.ndim))
    if voxel is None:
        example = "Z,Y,X" if data.ndim == 3 else "Y,X"
        raise InputError(f"{path} does not record its voxel size; pass --voxel-size {example} (nm)")
    if not all(v is not None and math.isfinite(v) and v > 0 for v in voxel):
        raise InputError(
            f"{path} records voxel size {voxel}, which is not positive; pass --voxel-size Z,Y,X (nm)"
        )
    return Volume(data, axes, tuple(float(v) for v in voxel), tuple(float(t) for t in offset), path, level)


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


def refuse_output(
    path_out: str | Path,
    path_in: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> None:
    """Refuse an output that would harm data: exists (without overwrite/resume), inside the input."""
    out = str(path_out)
    if _is_url(out):
        return
    out_path = _local(out).resolve()
    if path_in is not None and not _is_url(str(path_in)):
        in_path = _local(str(path_in)).resolve()
        if out_path == in_path or in_path in out_path.parents:
            raise InputError(f"output {path_out} is inside the input {path_in}; choose an output elsewhere")
        if out_path in in_path.parents:
            raise InputError(f"output {path_out} contains the input {path_in}; choose an output elsewhere")
    if out_path.exists() and not (overwrite or resume):
        raise InputError(f"output {path_out} exists; pass --overwrite to replace it or --resume to continue")
    if out_path.exists() and not out_path.is_dir():
        raise InputError(f"output {path_out} is a file, not an OME-Zarr folder; choose another output")
    parent = out_path.parent
    if not parent.exists():
        raise InputError(f"the folder {parent} for output {path_out} does not exist; create it first")
    if not parent.is_dir():
        raise InputError(f"{parent} is a file, not a folder, so output {path_out} cannot go there; choose another output")
    _check_writable(out_path if out_path.exists() else parent, path_out)


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
    are kept; ``overwrite`` replaces this path only.
    """
    path = str(path)
    local = _local(path)
    if local.exists():
        if not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it")
        shutil.rmtree(local)
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
    da.store(data.rechunk(target.chunks), target, lock=False, compute=compute)
    finalize_image(path, levels=levels, voxel_size=voxel_size, axes=axes, translation=translation)
    return str(path)


def describe(path: str | Path) -> dict:
    """Facts about an image for ``emdiffuse info``: shape, dtype, chunks, voxel size, levels."""
    volume = open_volume(path)
    facts: dict = {
        "path": str(path),
        "axes": volume.axes,
        "shape": volume.shape,
        "dtype": str(volume.dtype),
        "chunks": tuple(c[0] for c in volume.data.chunks),
        "voxel_size_nm": volume.voxel_size,
        "translation_nm": volume.translation,
        "levels": [],
        "children": [],
    }
    local = _local(str(path))
    if local.is_dir():
        group = zarr.open_group(str(local), mode="r")
        ms, version = _multiscales(group)
        facts["ngff_version"] = version
        for i in range(len(ms["datasets"])):
            level = open_volume(path, level=i)
            facts["levels"].append({"level": i, "shape": level.shape, "voxel_size_nm": level.voxel_size})
        for child_name, child in group.groups():
            try:
                _multiscales(child)
                facts["children"].append(child_name)
            except KeyError:
                continue
    return facts
