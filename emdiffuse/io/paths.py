"""Where a volume lives: a local path (``file://`` allowed) or a URL, and which format it is in.

A location may carry what neuroglancer writes before it (``precomputed://gs://bucket/em``,
``n5://https://host/data.n5``) and, for HDF5, the dataset inside the file
(``raw.h5:/volumes/raw`` or ``raw.h5#/volumes/raw``). :func:`local_path` and
:func:`exists` look at the file or folder itself; :func:`input_format` says which reader
opens it (by prefix, suffix, then the metadata files or magic bytes found there).
"""

from __future__ import annotations

import re
from pathlib import Path

import fsspec

# neuroglancer's data-source prefixes: ``precomputed://gs://...``, ``n5://https://...``
FORMAT_PREFIXES = {"precomputed": "precomputed", "n5": "n5", "zarr": "ome-zarr", "zarr2": "ome-zarr",
                   "zarr3": "ome-zarr"}  # fmt: skip
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".st", ".ali")
TIFF_SUFFIXES = (".tif", ".tiff")
_PREFIX = re.compile(r"^(?P<format>[a-z0-9]+)://(?P<rest>.*)$", re.IGNORECASE)
_INNER = re.compile(
    r"^(?P<file>.+?(?:" + "|".join(re.escape(s) for s in HDF5_SUFFIXES) + r"))"
    r"(?:[:#](?P<inner>/.*))?$",
    re.IGNORECASE,
)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ZARR_FILES = ("zarr.json", ".zgroup", ".zarray", ".zattrs")


def strip_prefix(path: str) -> tuple[str | None, str]:
    """``precomputed://gs://b/p`` -> ``("precomputed", "gs://b/p")``; no prefix -> None.

    ``precomputed:///data/em`` (a local path after the prefix) stays a local path.
    """
    match = _PREFIX.match(path)
    if match and match["format"].lower() in FORMAT_PREFIXES:
        return FORMAT_PREFIXES[match["format"].lower()], match["rest"]
    return None, path


def split_inner(path: str) -> tuple[str, str | None]:
    """The HDF5 file and the dataset path inside it: ``raw.h5:/volumes/raw`` and
    ``raw.h5#/volumes/raw`` -> (``raw.h5``, ``/volumes/raw``); anything else -> (path, None)."""
    _, rest = strip_prefix(path)
    match = _INNER.match(rest)
    if match is None:
        return rest, None
    return match["file"], match["inner"]


def container(path: str) -> str:
    """The file, folder or URL that holds the image: prefix and HDF5 dataset path removed."""
    return split_inner(path)[0]


def is_url(path: str) -> bool:
    """A remote location (``s3://``, ``https://``, ...); ``file://`` is local."""
    location = container(path)
    return "://" in location and not location.startswith("file://")


def local_path(path: str) -> Path:
    """The local file or folder of ``path`` (``file://``, a format prefix and an HDF5
    dataset path removed)."""
    location = container(path)
    return Path(location[len("file://") :]) if location.startswith("file://") else Path(location)


def exists(path: str) -> bool:
    """Whether ``path`` (local or URL) exists."""
    if is_url(path):
        fs, _, paths = fsspec.get_fs_token_paths(container(path))
        return fs.exists(paths[0])
    return local_path(path).exists()


def file_identity(path: str) -> tuple:
    """What changes when the file at ``path`` (local or URL) is rewritten or replaced: device,
    inode, size and modification time; a URL's size, ETag and modification time."""
    location = container(path)
    if is_url(location):
        fs, _, paths = fsspec.get_fs_token_paths(location)
        info = fs.info(paths[0])
        etag = info.get("ETag") or info.get("etag") or ""
        modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or ""
        return ("url", location, str(info.get("size")), str(etag), str(modified))
    st = local_path(location).stat()
    return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def join(location: str, name: str) -> str:
    """``name`` inside the folder or URL ``location``."""
    return f"{location.rstrip('/')}/{name}"


def has_file(location: str, name: str) -> bool:
    """Whether the folder or URL ``location`` holds a file ``name`` (False when unreachable)."""
    try:
        if is_url(location):
            fs, _, paths = fsspec.get_fs_token_paths(join(container(location), name))
            return fs.isfile(paths[0])
        return (local_path(location) / name).is_file()
    except Exception:  # unreachable or refused: treated as absent here, the reader says why
        return False


def _magic(path: Path) -> str | None:
    """The format a local file's first bytes name, if any."""
    try:
        with path.open("rb") as handle:
            head = handle.read(224)
    except OSError:
        return None
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[208:212] == b"MAP ":
        return "mrc"
    return None


def input_format(path: str) -> str:
    """Which reader opens ``path``: ``ome-zarr``, ``tiff``, ``hdf5``, ``n5``,
    ``precomputed`` or ``mrc``.

    In order: a neuroglancer prefix (``precomputed://``, ``n5://``, ``zarr://``); the file's
    suffix (``.h5``/``.hdf5``, ``.mrc``/``.map``/``.rec``, ``.tif``); a folder named
    ``*.n5`` or ``*.zarr`` on the way; the magic bytes of a local file; the metadata a
    folder or URL holds (``zarr.json``/``.zattrs`` Zarr, ``info`` precomputed,
    ``attributes.json`` N5); else OME-Zarr (whose reader says what is wrong).
    """
    prefix, rest = strip_prefix(path)
    if prefix is not None:
        return prefix
    location, inner = split_inner(rest)
    if inner is not None or location.lower().endswith(HDF5_SUFFIXES):
        return "hdf5"
    name = location.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith(MRC_SUFFIXES):
        return "mrc"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    segments = [s.lower() for s in location.rstrip("/").split("/")]
    for segment in reversed(segments):
        if segment.endswith(".n5"):
            return "n5"
        if segment.endswith(".zarr"):
            return "ome-zarr"
    if not is_url(location):
        local = local_path(location)
        if local.is_file():
            return _magic(local) or "ome-zarr"
        if not local.is_dir():
            return "ome-zarr"
    if any(has_file(location, f) for f in _ZARR_FILES):
        return "ome-zarr"
    if has_file(location, "info"):
        return "precomputed"
    if has_file(location, "attributes.json"):
        return "n5"
    return "ome-zarr"
