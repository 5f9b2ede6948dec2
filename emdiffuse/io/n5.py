"""Read N5 through tensorstore: a dataset, or a multiscale group (``--level``), local or remote.

N5 lists axes x first; the reader turns them into zyx. Scale levels of a group: the
``multiscales`` list COSEM / OpenOrganelle write, else its datasets ``s0``, ``s1``, ...
(n5-viewer, BigDataViewer; a BigDataViewer root is read at ``setup0/timepoint0``).

Voxel size (nm) and translation of a level, from its attributes, then its group's:
``pixelResolution`` (``{"dimensions": [x, y, z], "unit": "nm"}``), COSEM's ``transform``
(``axes``, ``scale``, ``translate``, ``units``), ``resolution`` ([x, y, z], nm unless
``units`` says otherwise); a group's size is scaled by the level's ``downsamplingFactors``
or the group's ``scales`` / ``downsamplingFactors`` list.

A dataset without ``attributes.json``, or whose attributes lack ``dimensions``,
``blockSize`` or ``dataType``, is a damaged N5: one line, exit 2.
"""

from __future__ import annotations

import hashlib

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io.image import RawImage, nm_per_unit
from emdiffuse.io.paths import container, is_url, join, local_path, strip_prefix
from emdiffuse.io.regions import dask_chunks
from emdiffuse.io.tstore import (
    TensorStoreReader,
    context,
    kvstore_url,
    open_error,
    read_json,
    tensorstore,
)

_REQUIRED = ("dimensions", "blockSize", "dataType")
_WHAT = "N5"


def _location(path: str) -> str:
    return container(strip_prefix(path)[1]).rstrip("/")


def _is_dataset(attrs: dict) -> bool:
    return "dimensions" in attrs or "dataType" in attrs or "blockSize" in attrs


def _check_dataset(label: str, attrs: dict) -> None:
    lacking = [k for k in _REQUIRED if k not in attrs]
    if lacking:
        raise InputError(
            f"{label} is a damaged N5 dataset: its attributes.json lacks {', '.join(lacking)}; "
            "restore the attributes (or re-export the data)"
        )


def _no_attributes(location: str, what: str = "dataset or group") -> InputError:
    if not is_url(location) and not local_path(location).exists():
        return InputError(f"{location} does not exist; check the path")
    return InputError(
        f"{location} has no attributes.json, so it is no N5 {what} (its attributes are missing); "
        "give an N5 group or dataset, or restore its attributes.json"
    )


def _levels(location: str, attrs: dict) -> tuple[str, dict, list[tuple[str, dict | None, dict]]]:
    """(group location, group attributes, levels): each level is (sub path, its entry in
    the group's ``multiscales`` or None, its attributes)."""
    for child in ("setup0", "timepoint0"):  # BigDataViewer: <root>/setup0/timepoint0/s0
        if "multiscales" in attrs or read_json(location, "s0/attributes.json", _WHAT)[0] is not None:
            break
        sub, _ = read_json(location, f"{child}/attributes.json", _WHAT)
        if sub is None:
            continue
        inherited = {k: v for k, v in attrs.items() if k in ("downsamplingFactors", "pixelResolution", "resolution")}
        location, attrs = join(location, child), {**inherited, **sub}
    entries: list[tuple[str, dict | None]] = []
    multiscales = attrs.get("multiscales")
    if isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict):
        entries = [(str(d["path"]), d) for d in multiscales[0].get("datasets", []) if isinstance(d, dict) and "path" in d]
    else:
        while True:
            name = f"s{len(entries)}"
            if read_json(location, f"{name}/attributes.json", _WHAT)[0] is None:
                if len(entries) == 0 and not is_url(location) and (local_path(location) / name).is_dir():
                    raise _no_attributes(join(location, name), "dataset")
                break
            entries.append((name, None))
    levels = []
    for name, entry in entries:
        level_attrs, _ = read_json(location, f"{name}/attributes.json", _WHAT)
        if level_attrs is None:
            raise _no_attributes(join(location, name), "dataset")
        levels.append((name, entry, level_attrs))
    return location, attrs, levels


def _xyz_to_zyx(values, n: int) -> list[float] | None:
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return list(reversed(values))[-n:] if len(values) >= n else None


def _unit(attrs: dict, default: float | None = 1.0) -> float | None:
    unit = attrs.get("units", attrs.get("unit"))
    if isinstance(unit, list):
        unit = unit[0] if unit else None
    return nm_per_unit(unit) if unit else default


def _transform(transform, n: int) -> tuple[list[float] | None, list[float] | None]:
    """COSEM's ``transform`` as (voxel nm, translation nm) along zyx."""
    if not isinstance(transform, dict):
        return None, None
    axes = [str(a).lower() for a in transform.get("axes", [])]
    scale, translate = transform.get("scale"), transform.get("translate")
    units = transform.get("units") or ["nm"] * len(axes)
    if not axes or scale is None or len(scale) != len(axes):
        return None, None
    if len(units) != len(axes):
        units = [units[0]] * len(axes)
    voxel, offset = [], []
    for name in "zyx"[-n:]:
        if name not in axes:
            return None, None
        i = axes.index(name)
        factor = nm_per_unit(units[i])
        if factor is None:
            return None, None
        voxel.append(float(scale[i]) * factor)
        offset.append(float(translate[i]) * factor if translate and len(translate) == len(axes) else 0.0)
    return voxel, offset


def _size(attrs: dict, n: int) -> list[float] | None:
    """nm per voxel (zyx) from ``pixelResolution`` or ``resolution``; None if absent."""
    pixel = attrs.get("pixelResolution")
    if isinstance(pixel, dict) and "dimensions" in pixel:
        voxel = _xyz_to_zyx(pixel["dimensions"], n)
        factor = nm_per_unit(pixel.get("unit")) if pixel.get("unit") else 1.0
    elif isinstance(pixel, list):
        voxel, factor = _xyz_to_zyx(pixel, n), _unit(attrs)
    elif "resolution" in attrs:
        voxel, factor = _xyz_to_zyx(attrs["resolution"], n), _unit(attrs)
    else:
        return None
    if voxel is None or factor is None:
        return None
    return [v * factor for v in voxel]


def _level_voxel(group: dict, entry: dict | None, attrs: dict, level: int, n: int):
    """(voxel nm or None per axis, translation nm, why unknown) of one level, zyx."""
    for transform in (attrs.get("transform"), (entry or {}).get("transform")):
        voxel, offset = _transform(transform, n)
        if voxel is not None:
            return voxel, offset, ""
    voxel = _size(attrs, n)
    if voxel is None:
        base = _size(group, n)
        factors = attrs.get("downsamplingFactors")
        for key in ("scales", "downsamplingFactors"):
            listed = group.get(key)
            if factors is None and isinstance(listed, list) and level < len(listed) and isinstance(listed[level], list):
                factors = listed[level]
        factors = _xyz_to_zyx(factors, n) if factors is not None else ([1.0] * n if level == 0 else None)
        if base is not None and factors is not None:
            voxel = [b * f for b, f in zip(base, factors, strict=True)]
    if voxel is None or not all(v > 0 for v in voxel):
        return [None] * n, [0.0] * n, "it has no pixelResolution, resolution or transform attribute"
    offset = _xyz_to_zyx(attrs.get("offset", []), n) or [0.0] * n
    return voxel, offset, ""


def identity(path: str, level: int = 0) -> tuple:
    """The content identity of the N5 input: the bytes of its attributes (group and level)."""
    location = _location(path)
    digest = hashlib.sha256()
    attrs, raw = read_json(location, "attributes.json", _WHAT)
    digest.update(raw)
    if attrs is not None and not _is_dataset(attrs):
        _, _, levels = _levels(location, attrs)
        for name, _entry, level_attrs in levels:
            digest.update(name.encode() + b"\0" + repr(sorted(level_attrs.items())).encode())
    return ("n5", location, level, digest.hexdigest())


def open_n5(path: str, level: int = 0) -> RawImage:
    """Level ``level`` of the N5 dataset or multiscale group at ``path``, as it is."""
    tensorstore(_WHAT)
    location = _location(path)
    attrs, _ = read_json(location, "attributes.json", _WHAT)
    if attrs is None:
        raise _no_attributes(location)
    if _is_dataset(attrs):
        _check_dataset(location, attrs)
        parent = location.rsplit("/", 1)[0] if "/" in location.strip("/") else None
        group = (read_json(parent, "attributes.json", _WHAT)[0] or {}) if parent else {}
        levels: list = [("", None, attrs)]
        try:  # a level of a multiscale group given directly: s3 is level 3 of its group
            index = int(location.rsplit("/", 1)[-1].lstrip("s"))
        except ValueError:
            index = 0
    else:
        location, group, levels = _levels(location, attrs)
        index = level
        if not levels:
            raise InputError(
                f"{location} is an N5 group without datasets (no multiscales, no s0); "
                "give an N5 dataset or a multiscale group"
            )
    if not 0 <= level < len(levels):
        raise InputError(f"{path} has levels 0..{len(levels) - 1}; level {level} does not exist")
    facts = []
    for i, (name, entry, level_attrs) in enumerate(levels):
        _check_dataset(join(location, name) if name else location, level_attrs)
        n_all = len(level_attrs["dimensions"])
        n = min(n_all, 3)
        voxel, offset, why = _level_voxel(group, entry, level_attrs, index if len(levels) == 1 else i, n)
        facts.append((name, level_attrs, voxel, offset, why, n_all))
    name, level_attrs, voxel, offset, why, n_all = facts[level]
    dataset = join(location, name) if name else location
    spec = {"driver": "n5", "kvstore": kvstore_url(dataset)}
    ts = tensorstore(_WHAT)
    try:
        store = ts.open(spec, read=True, context=context()).result()
    except Exception as error:
        raise open_error(dataset, error, "N5 dataset") from None
    shape = tuple(reversed(store.shape))
    chunks = tuple(reversed(store.chunk_layout.read_chunk.shape))
    dtype = np.dtype(store.dtype.numpy_dtype)
    names, problem = _axis_names(level_attrs, shape)
    spatial = [i for i, a in enumerate(names) if a in "zyx"]
    fixed = {i: 0 for i in range(len(shape)) if i not in spatial} if not problem else {}
    if problem:
        spatial = list(range(len(shape)))
    token = identity(path, level)[-1]
    reader = TensorStoreReader(
        spec, "n5", {"style": "n5", "prefix": ""}, dataset,
        [shape[i] for i in spatial], dtype, dask_chunks([shape[i] for i in spatial], [chunks[i] for i in spatial], 1),
        token, perm=spatial, fixed=fixed,
    )  # fmt: skip
    details = {"dataset": name or location.rsplit("/", 1)[-1], "compression": (level_attrs.get("compression") or {}).get("type", "raw")}
    listed = [
        {"level": i, "shape": tuple(reversed(a["dimensions"])), "voxel_size_nm": tuple(v)}
        for i, (_, a, v, _, _, _) in enumerate(facts)
    ] if len(levels) > 1 else None  # fmt: skip
    axes = "".join(names[i] for i in spatial)
    return RawImage(reader.to_dask(), axes, voxel, offset, f"{path} {problem}" if problem else None, why,
                    "N5", details, listed)  # fmt: skip


def _axis_names(attrs: dict, shape: tuple[int, ...]) -> tuple[str, str | None]:
    """Axis names in reader order (N5 ``axes`` reversed, else z, y, x after any channel
    axes), and why the image is no volume (a non-spatial axis longer than 1), if so."""
    axes = attrs.get("axes")
    if isinstance(axes, list) and len(axes) == len(shape):
        names = "".join(str(a)[:1].lower() for a in reversed(axes))
    else:
        names = "zyx"[-len(shape) :] if len(shape) <= 3 else "c" * (len(shape) - 3) + "zyx"
    for name, n in zip(names, shape, strict=True):
        if name not in "zyx" and n > 1:
            return names, (
                f"has a non-spatial axis {name!r} of size {n}; split it into one image per "
                "channel/time point first"
            )
    return names, None
