"""Read HDF5 images through h5py, chunk by chunk: CREMI, ilastik / vigra, BigDataViewer.

Which dataset: ``file.h5:/volumes/raw`` (or ``file.h5#/volumes/raw``); without a dataset
path, the file's one image dataset (BigDataViewer files: setup 0, time point 0). A group
whose datasets are scale levels (``s0``, ``s1``, ... or ``0``, ``1``, ...) is a multiscale
image (``--level``); so is a BigDataViewer file (``s00/resolutions``, ``t00000/s00/<level>/cells``).

Voxel size and translation, from the dataset's attributes (then its group's):
``resolution`` (zyx, nm unless a ``unit`` attribute says otherwise) and ``offset`` (zyx, same
unit) as CREMI writes them; ``element_size_um`` (zyx, µm) as vigra / ilastik / Fiji's HDF5
plugin write it; ``pixelResolution`` (``{"dimensions": [x, y, z], "unit": "nm"}``); and a
BigDataViewer file's ``voxelSize`` from the ``.xml`` beside it. vigra ``axistags`` give the
axis order (a singleton channel axis is dropped).

Reading is lazy: :class:`Hdf5Reader` opens the file in each process (h5py handles do not
pickle) and reads only the chunks under a region. Local files, and URLs through fsspec.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import fsspec
import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io.image import RawImage, nm_per_unit
from emdiffuse.io.paths import container, exists, file_identity, is_url, local_path, split_inner
from emdiffuse.io.regions import RegionReader, dask_chunks, one_line, require

_LEVEL_NAMES = ("s{}", "{}")
_MIN_SIDE = 8  # the y and x sides of an image dataset are at least this


def _h5py():
    return require("h5py", "HDF5")


# h5py's chunk cache per open dataset (its default, 1 MiB, holds one typical chunk): neighbouring
# regions share chunks, so a run decodes each about once
_CHUNK_CACHE = {"rdcc_nbytes": 16 << 20, "rdcc_nslots": 4099}


def _open_file(location: str):
    """(h5py.File, the fsspec file under it or None) for a local path or a URL."""
    h5py = _h5py()
    if is_url(location):
        handle = fsspec.open(location, "rb").open()
        return h5py.File(handle, "r", **_CHUNK_CACHE), handle
    return h5py.File(str(local_path(location)), "r", locking=False, **_CHUNK_CACHE), None


class Hdf5Reader(RegionReader):
    """Regions of one HDF5 dataset; the file is opened once per process (and content)."""

    kind = "hdf5"

    def __init__(self, location: str, dataset: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.file, self.dataset = location, dataset

    def location(self) -> tuple:
        return (self.file, self.dataset)

    def open(self):
        file, handle = _open_file(self.file)
        return file, handle, file[self.dataset]

    def read(self, handle, selection: tuple) -> np.ndarray:
        return np.asarray(handle[2][selection])


def _attrs(obj) -> dict:
    """The object's attributes as plain Python values (bytes decoded, arrays as lists)."""
    out = {}
    for key in obj.attrs:
        try:
            value = obj.attrs[key]
        except Exception:  # an attribute of a type h5py cannot read
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.ndarray):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value.tolist()]
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _is_image(dataset) -> bool:
    shape = dataset.shape or ()
    return (
        len(shape) >= 2
        and dataset.dtype.kind in "uifc"
        and sorted(shape)[-2] >= _MIN_SIDE
    )


def _images(file) -> list[tuple[str, object]]:
    """All image-like datasets in the file, by name."""
    h5py = _h5py()
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and _is_image(obj):
            found.append(("/" + name, obj))

    file.visititems(visit)
    return found


def _holdings(file, path: str, limit: int = 6) -> str:
    images = _images(file)
    if not images:
        return "no image dataset"
    names = [f"{name} {tuple(d.shape)} {d.dtype}" for name, d in images[:limit]]
    more = f" and {len(images) - limit} more" if len(images) > limit else ""
    # the example: a raw image rather than labels (64-bit integers)
    example = min(images, key=lambda item: ("raw" not in item[0].lower(), item[1].dtype.itemsize == 8))
    return f"{', '.join(names)}{more}; name one as {container(path)}:{example[0]}"


def _level_datasets(group) -> list[tuple[str, object]]:
    """The scale levels of a multiscale group: its datasets ``s0, s1, ...`` or ``0, 1, ...``
    (BigDataViewer: ``<level>/cells``), in order; empty if it is none."""
    h5py = _h5py()
    for pattern in _LEVEL_NAMES:
        levels = []
        while True:
            name = pattern.format(len(levels))
            obj = group.get(name)
            if isinstance(obj, h5py.Group) and isinstance(obj.get("cells"), h5py.Dataset):
                obj, name = obj["cells"], f"{name}/cells"
            if not isinstance(obj, h5py.Dataset):
                break
            levels.append((f"{group.name.rstrip('/')}/{name}", obj))
        if levels:
            return levels
    return []


def _bdv(file) -> tuple[str, list[list[float]]] | None:
    """A BigDataViewer file's group of setup 0 at time point 0 and its per-level
    downsampling factors (xyz), or None."""
    h5py = _h5py()
    setup = file.get("t00000/s00")
    factors = file.get("s00/resolutions")
    if not isinstance(setup, h5py.Group) or not isinstance(factors, h5py.Dataset):
        return None
    return setup.name, np.asarray(factors[()], dtype=float).reshape(-1, 3).tolist()


def _bdv_voxel(path: str) -> tuple[list[float] | None, str]:
    """nm per voxel (xyz) from the BigDataViewer XML beside ``path``, and its unit name."""
    location = container(path)
    if is_url(location):
        return None, ""
    xml = local_path(location).with_suffix(".xml")
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None, ""
    for element in root.iter("voxelSize"):
        unit = (element.findtext("unit") or "").strip()
        size = (element.findtext("size") or "").split()
        factor = nm_per_unit(unit)
        try:
            values = [float(v) for v in size]
        except ValueError:
            continue
        if factor and len(values) == 3:
            return [v * factor for v in values], unit
    return None, ""


def _axes(attrs: dict, shape: tuple[int, ...]) -> tuple[str, str | None]:
    """The dataset's axis names (vigra ``axistags``, else zyx / yx), and why it is no
    volume (a channel axis longer than 1), if so."""
    names = None
    tags = attrs.get("axistags")
    if isinstance(tags, str):
        try:
            names = "".join(a["key"] for a in json.loads(tags)["axes"]).lower()
        except (ValueError, KeyError, TypeError):
            names = None
    if names is None or len(names) != len(shape):
        if len(shape) == 4 and shape[-1] == 1:
            names = "zyxc"
        elif len(shape) == 4 and shape[0] == 1:
            names = "czyx"
        else:
            names = "zyx"[-len(shape) :] if len(shape) <= 3 else "".join(f"{i}" for i in range(len(shape)))
    for name, n in zip(names, shape, strict=True):
        if name not in "zyx" and n > 1:
            return names, f"has a non-spatial axis {name!r} of size {n}; split it into one image per channel/time point first"
    return names, None


def _size_attrs(attrs: dict, n: int) -> tuple[list[float] | None, list[float] | None, float | None]:
    """(voxel size, offset) in the attributes' unit along the n spatial axes (zyx), and nm
    per that unit; None where absent."""
    unit = attrs.get("unit", attrs.get("units"))
    if isinstance(unit, list):
        unit = unit[0] if unit else None
    factor = nm_per_unit(unit) if unit else 1.0
    voxel = None
    if "element_size_um" in attrs:
        voxel, factor = attrs["element_size_um"], 1000.0
    elif "resolution" in attrs:
        voxel = attrs["resolution"]
    elif isinstance(attrs.get("pixelResolution"), dict):
        pixel = attrs["pixelResolution"]
        voxel = list(reversed(pixel.get("dimensions", [])))  # stored xyz
        factor = nm_per_unit(pixel.get("unit")) or 1.0
    offset = attrs.get("offset")
    return _numbers(voxel, n), _numbers(offset, n), factor


def _numbers(value, n: int) -> list[float] | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=float))]
    except (TypeError, ValueError):
        return None
    if len(values) < n:
        return None
    return values[-n:]


def open_hdf5(path: str, level: int = 0) -> RawImage:
    """Level ``level`` of the HDF5 image at ``path`` (``file.h5[:/dataset]``), as it is."""
    location, inner = split_inner(path)
    if not exists(location):
        raise InputError(f"{location} does not exist; check the path")
    _h5py()
    token = file_identity(location)
    try:
        file, handle = _open_file(location)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{location} is a truncated or corrupt HDF5 file ({one_line(error)})") from None
    try:
        return _read_image(file, path, location, inner, level, token)
    except InputError:
        raise
    except Exception as error:  # h5py raises OSError / KeyError / RuntimeError for damage
        raise InputError(f"{location} is a truncated or corrupt HDF5 file ({one_line(error)})") from None
    finally:
        file.close()
        if handle is not None:
            handle.close()


def _read_image(file, path, location, inner, level, token) -> RawImage:
    h5py = _h5py()
    factors = None  # per-level downsampling (xyz) where a file states it
    bdv = _bdv(file) if inner is None else None
    if bdv is not None:
        levels = _level_datasets(file[bdv[0]])
        factors = bdv[1]
    elif inner is not None:
        obj = file.get(inner)
        if obj is None:
            raise InputError(f"{location} has no dataset {inner}; it holds {_holdings(file, path)}")
        if isinstance(obj, h5py.Group):
            levels = _level_datasets(obj)
            if not levels:
                raise InputError(
                    f"{location}:{inner} is a group, not an image dataset (nor scale levels s0, s1, ...); "
                    f"it holds {_holdings(file, path)}"
                )
        elif not _is_image(obj):
            raise InputError(
                f"{location}:{inner} is a dataset of shape {tuple(obj.shape)} {obj.dtype}, not an image; "
                f"the file holds {_holdings(file, path)}"
            )
        else:
            levels = [(obj.name, obj)]
    else:
        levels = _images(file)
        if not levels:
            raise InputError(f"{location} holds no image dataset (2D or more, numeric); give an HDF5 image")
        if len(levels) > 1:
            raise InputError(f"{location} holds {len(levels)} image datasets: {_holdings(file, path)}")
    if not 0 <= level < len(levels):
        raise InputError(f"{path} has levels 0..{len(levels) - 1}; level {level} does not exist")
    name, dataset = levels[level]
    attrs = _attrs(dataset)
    group_attrs = _attrs(dataset.parent)
    names, problem = _axes(attrs, tuple(dataset.shape))
    spatial = [i for i, a in enumerate(names) if a in "zyx"]
    fixed = {} if problem else {i: 0 for i in range(len(names)) if i not in spatial}
    if problem:
        spatial = list(range(len(names)))
    axes = "".join(names[i] for i in spatial) if not problem else names
    n = len(spatial)
    shape = [dataset.shape[i] for i in spatial]
    stored = None if dataset.chunks is None else [dataset.chunks[i] for i in spatial]
    chunks = dask_chunks(shape, stored, dataset.dtype.itemsize)
    dtype = np.dtype("uint16") if bdv is not None and dataset.dtype == np.int16 else dataset.dtype
    reader = Hdf5Reader(location, name, f"{location}:{name}", shape, dtype, chunks, token,
                        perm=spatial, fixed=fixed)  # fmt: skip
    voxel, offset, unknown = _voxel(path, dataset, attrs, group_attrs, n, level, factors, bdv is not None)
    storage = f"chunks {tuple(dataset.chunks)}" if dataset.chunks else "contiguous"
    details = {"dataset": name, "storage": f"{storage}, {dataset.compression or 'uncompressed'}"}
    listed = [
        {"level": i, "shape": tuple(d.shape[j] for j in spatial) if len(d.shape) == len(names) else tuple(d.shape),
         "voxel_size_nm": tuple(_voxel(path, d, _attrs(d), group_attrs, n, i, factors, bdv is not None)[0])}
        for i, (_, d) in enumerate(levels)
    ] if len(levels) > 1 else None  # fmt: skip
    return RawImage(reader.to_dask(), axes if not problem else names, voxel, offset,
                    f"{path} {problem}" if problem else None, unknown, "HDF5", details, listed)  # fmt: skip


def _voxel(path, dataset, attrs, group_attrs, n, level, factors, bdv) -> tuple[list, list, str]:
    """(voxel size nm or None per axis, offset, why unknown) of one level (zyx)."""
    voxel, offset, factor = _size_attrs(attrs, n)
    if voxel is None:
        base, group_offset, factor = _size_attrs(group_attrs, n)
        if base is not None and factors is None and level > 0:
            base = None  # a group's size is level 0's: the level's own size is unknown
        voxel, offset = base, offset if offset is not None else group_offset
    if voxel is None and bdv:
        sizes, _unit = _bdv_voxel(path)
        if sizes is not None:
            voxel, factor = list(reversed(sizes))[-n:], 1.0
    if voxel is not None and factors is not None and level < len(factors):
        scale = list(reversed(factors[level]))[-n:]  # stated xyz
        if not ("resolution" in attrs or "element_size_um" in attrs):
            voxel = [v * s for v, s in zip(voxel, scale, strict=True)]
    if voxel is None or factor is None or not all(v > 0 for v in voxel):
        why = "its resolution attribute has an unknown unit" if voxel is not None else (
            "it has no resolution, element_size_um or pixelResolution attribute")  # fmt: skip
        return [None] * n, [0.0] * n if offset is None else [float(o) for o in offset], why
    nm = [v * factor for v in voxel]
    return nm, [0.0] * n if offset is None else [o * factor for o in offset], ""
