"""Read neuroglancer precomputed volumes through tensorstore, local or remote.

``precomputed://gs://bucket/volume`` (neuroglancer's spelling), a URL or folder holding an
``info`` file. The ``info`` gives the scales (``--level`` picks one), each scale's size,
``resolution`` (nm per voxel, x y z), ``voxel_offset`` (the translation, in voxels),
``chunk_sizes`` and ``encoding`` (raw, jpeg, png, compressed_segmentation; sharded or not).
A ``segmentation`` volume (labels) or one of several channels is described by ``info`` and
refused for enhancement.

An ``info`` that disagrees with its chunks is damaged input, found before anything is
written: a chunk of a local volume whose name does not lie on the info's chunk grid, or a
first chunk that does not decode to the info's chunk size.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io.image import RawImage
from emdiffuse.io.paths import container, is_url, local_path, strip_prefix
from emdiffuse.io.regions import dask_chunks
from emdiffuse.io.tstore import (
    TensorStoreReader,
    context,
    kvstore_url,
    open_error,
    read_json,
    tensorstore,
)

_WHAT = "neuroglancer precomputed"
_SCALE_KEYS = ("key", "size", "resolution", "chunk_sizes", "encoding")
_CHUNK_NAME = re.compile(r"^(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)$")
_NAMES_CHECKED = 10_000  # chunk names of a local scale checked against the info's grid


def _location(path: str) -> str:
    return container(strip_prefix(path)[1]).rstrip("/")


def _info(path: str) -> tuple[str, dict, bytes]:
    location = _location(path)
    info, raw = read_json(location, "info", "precomputed info")
    if info is None:
        if not is_url(location) and not local_path(location).exists():
            raise InputError(f"{location} does not exist; check the path")
        raise InputError(
            f"{location} has no info file, so it is no neuroglancer precomputed volume; give the "
            "folder or URL that holds the volume's info"
        )
    damaged = f"{location}/info is damaged (it disagrees with the precomputed format)"
    scales = info.get("scales")
    if not isinstance(scales, list) or not scales or not all(isinstance(s, dict) for s in scales):
        raise InputError(f"{damaged}: it lists no scales; restore it or re-export the volume")
    for i, scale in enumerate(scales):
        lacking = [k for k in _SCALE_KEYS if k not in scale]
        if lacking:
            raise InputError(f"{damaged}: scale {i} lacks {', '.join(lacking)}; restore it or re-export the volume")
    for key in ("data_type", "num_channels", "type"):
        if key not in info:
            raise InputError(f"{damaged}: it lacks {key}; restore it or re-export the volume")
    return location, info, raw


def identity(path: str, level: int = 0) -> tuple:
    """The content identity of the precomputed input: the bytes of its ``info``."""
    location = _location(path)
    _, raw = read_json(location, "info", "precomputed info")
    return ("precomputed", location, level, hashlib.sha256(raw).hexdigest())


def _check_chunk_names(location: str, scale: dict) -> None:
    """Refuse a local, unsharded scale whose stored chunk names do not lie on the info's
    chunk grid (chunk size, voxel offset, size): such an info reads zeros where the data are."""
    if is_url(location) or scale.get("sharding"):
        return
    folder = local_path(location) / str(scale["key"])
    if not folder.is_dir():
        return
    size = [int(v) for v in scale["size"]]
    offset = [int(v) for v in scale.get("voxel_offset", [0, 0, 0])]
    chunk = [int(v) for v in scale["chunk_sizes"][0]]
    with os.scandir(folder) as entries:
        for entry in itertools.islice(entries, _NAMES_CHECKED):
            match = _CHUNK_NAME.match(entry.name.removesuffix(".gz"))
            if match is None:
                continue
            bounds = [int(v) for v in match.groups()]
            for axis in range(3):
                lo, hi = bounds[2 * axis], bounds[2 * axis + 1]
                start = lo - offset[axis]
                end = min(lo + chunk[axis], offset[axis] + size[axis])
                if start < 0 or start % chunk[axis] or hi != end:
                    raise InputError(
                        f"{location}/info disagrees with its chunks: scale {scale['key']} stores chunk "
                        f"{entry.name}, which does not lie on the info's grid (chunk size {chunk}, "
                        f"voxel offset {offset}, size {size}, x y z); fix the info or re-export the volume"
                    )


def open_precomputed(path: str, level: int = 0) -> RawImage:
    """Scale ``level`` of the neuroglancer precomputed volume at ``path``, as it is."""
    ts = tensorstore(_WHAT)
    location, info, raw = _info(path)
    scales = info["scales"]
    if not 0 <= level < len(scales):
        raise InputError(f"{path} has levels 0..{len(scales) - 1}; level {level} does not exist")
    scale = scales[level]
    problem = None
    if info["type"] != "image":
        problem = (
            f"{path} is a neuroglancer {info['type']} volume (labels), not an image; "
            "enhance and train read EM images: give the image layer"
        )
    elif int(info["num_channels"]) != 1:
        problem = (
            f"{path} has {info['num_channels']} channels; EM input is one grey value per voxel: "
            "give a one-channel volume"
        )
    _check_chunk_names(location, scale)
    spec = {"driver": "neuroglancer_precomputed", "kvstore": kvstore_url(location), "scale_index": level}
    try:
        store = ts.open(spec, read=True, context=context()).result()
    except Exception as error:
        raise open_error(location, error, "neuroglancer precomputed volume") from None
    shape = tuple(reversed(store.shape[:3]))  # x y z channel -> z y x
    chunks = tuple(reversed(store.chunk_layout.read_chunk.shape[:3]))
    dtype = np.dtype(store.dtype.numpy_dtype)
    origin = [int(v) for v in store.domain.inclusive_min[:3]]
    token = hashlib.sha256(raw).hexdigest()
    key = str(scale["key"]).rstrip("/") + "/"
    reader = TensorStoreReader(
        spec, "precomputed", {"style": "" if scale.get("sharding") else "precomputed", "prefix": key,
                              "origin": origin},
        f"{location} (scale {level})", shape, dtype, dask_chunks(shape, chunks, 1), token,
    )  # fmt: skip
    if problem is None:  # the first chunk decodes to what the info says
        try:
            reader[tuple(slice(0, c) for c in reader.chunks)]
        except InputError as error:
            raise InputError(
                str(error).replace("; the input is damaged", "; the info disagrees with its chunks "
                                   "or the chunk is damaged", 1)
            ) from None
    resolution = [float(v) for v in reversed(scale["resolution"])]
    offset = [o * r for o, r in zip(reversed(origin), resolution, strict=True)]
    details = {
        "type": info["type"],
        "encoding": scale["encoding"],
        "chunk size (x, y, z)": tuple(int(c) for c in scale["chunk_sizes"][0]),
        "sharded": bool(scale.get("sharding")),
        "scale key": scale["key"],
    }
    listed = [
        {"level": i, "shape": tuple(int(v) for v in reversed(s["size"])),
         "voxel_size_nm": tuple(float(v) for v in reversed(s["resolution"]))}
        for i, s in enumerate(scales)
    ] if len(scales) > 1 else None  # fmt: skip
    return RawImage(reader.to_dask(), "zyx", list(resolution), offset, problem, "", "neuroglancer precomputed",
                    details, listed)  # fmt: skip


__all__ = ["identity", "open_precomputed"]
