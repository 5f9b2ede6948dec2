"""What the N5 and neuroglancer-precomputed readers share: tensorstore, its key-value stores
(local folders, ``file://``, ``http(s)://``, ``gs://``, ``s3://``) and its errors.

:class:`TensorStoreReader` is the picklable region reader over a tensorstore spec: it
opens the store once per process (and content) with a bounded retry policy for remote
stores, and reads a region as numpy. Tensorstore's errors are sorted into damaged data
(an :class:`~emdiffuse.errors.InputError` naming the chunk) and failures to reach the
store (an ``OSError``: the CLI says the I/O failed).
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io.paths import container, is_url, local_path
from emdiffuse.io.regions import RegionReader, require

# remote stores: a few quick retries, not tensorstore's default of minutes of back-off
_CONTEXT_SPEC = {
    "http_request_retries": {"max_retries": 4, "initial_delay": "0.2s", "max_delay": "2s"},
    "gcs_request_retries": {"max_retries": 4, "initial_delay": "0.2s", "max_delay": "2s"},
    "s3_request_retries": {"max_retries": 4, "initial_delay": "0.2s", "max_delay": "2s"},
    "data_copy_concurrency": {"limit": 1},
    # decoded chunks shared by neighbouring regions, per process; revalidated against the
    # store on each read (a chunk rewritten in place is read again)
    "cache_pool": {"total_bytes_limit": 64 << 20},
}
_CONTEXT: list = []
_LOCK = threading.Lock()
# status codes of tensorstore errors that mean the store could not be reached or used
_UNREACHABLE = ("UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED",
                "RESOURCE_EXHAUSTED", "CANCELLED")  # fmt: skip
_NOISE = re.compile(r"\s*\[(tensorstore_spec|source locations|curl_code)=.*?\](?=\s*(\[|$))")


def tensorstore(what: str):
    return require("tensorstore", what)


def context():
    """The process's tensorstore context (made once; remote retries bounded)."""
    ts = tensorstore("N5 and neuroglancer precomputed")
    with _LOCK:
        if not _CONTEXT:
            spec = dict(_CONTEXT_SPEC)
            try:
                _CONTEXT.append(ts.Context(spec))
            except Exception:  # an older tensorstore without one of these resources
                _CONTEXT.append(ts.Context({"http_request_retries": spec["http_request_retries"]}))
        return _CONTEXT[0]


def kvstore_url(location: str) -> str:
    """The tensorstore key-value store URL of a folder or URL (ends with ``/``)."""
    location = container(location)
    if is_url(location):
        return location.rstrip("/") + "/"
    return "file://" + str(local_path(location).resolve()).rstrip("/") + "/"


def status(error: BaseException) -> str:
    """The status code that starts a tensorstore error message (``NOT_FOUND``, ...)."""
    match = re.match(r"([A-Z_]+):", str(error))
    return match.group(1) if match else ""


def message(error: BaseException) -> str:
    """A tensorstore error on one line, without the spec it appends."""
    return " ".join(_NOISE.sub("", str(error)).split())


def unreachable(error: BaseException) -> bool:
    return status(error) in _UNREACHABLE


def read_bytes(location: str, name: str) -> bytes | None:
    """The bytes of ``name`` under the folder or URL ``location``; None when absent."""
    if not is_url(location):
        try:
            return (local_path(location) / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    ts = tensorstore("N5 and neuroglancer precomputed")
    try:
        store = ts.KvStore.open(kvstore_url(location), context=context()).result()
        result = store.read(name).result()
    except Exception as error:
        raise OSError(f"cannot read {container(location).rstrip('/')}/{name}: {message(error)}") from None
    return bytes(result.value) if result.state == "value" else None


def read_json(location: str, name: str, what: str) -> tuple[dict | None, bytes]:
    """``name`` under ``location`` as a JSON object (None when absent) and its bytes; an
    InputError naming ``what`` when it is not a JSON object."""
    raw = read_bytes(location, name)
    if raw is None:
        return None, b""
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise InputError(
            f"{container(location).rstrip('/')}/{name} is not valid JSON ({error}); the {what} is damaged"
        ) from None
    if not isinstance(value, dict):
        raise InputError(f"{container(location).rstrip('/')}/{name} is not a JSON object; the {what} is damaged")
    return value, raw


class TensorStoreReader(RegionReader):
    """Regions of a tensorstore (N5, neuroglancer precomputed), seen zyx.

    ``spec`` opens the stored array; ``view`` says how it becomes zyx: ``"n5"`` reverses
    the axes (N5 lists them x first), ``"precomputed"`` takes channel 0, moves the origin
    to 0 and reverses x, y, z.
    """

    kind = "tensorstore"

    def __init__(self, spec: dict, view: str, keys: dict, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec, self.view, self.keys = spec, view, keys

    def location(self) -> tuple:
        return (json.dumps(self.spec, sort_keys=True), self.view)

    def open(self):
        ts = tensorstore("N5 and neuroglancer precomputed")
        store = ts.open(self.spec, read=True, context=context()).result()
        if self.view == "precomputed":
            store = store[ts.d["channel"][0]].translate_to[0]
        return store.T

    def read(self, handle, selection: tuple) -> np.ndarray:
        return np.asarray(handle[selection].read().result())

    def is_damage(self, error: Exception) -> bool:
        return not unreachable(error) and super().is_damage(error)

    def reason(self, error: BaseException) -> str:
        return message(error)

    def failed(self, box, error: Exception) -> Exception:
        if unreachable(error) or (isinstance(error, OSError) and error.errno is not None):
            return OSError(f"reading {self.label} failed: {message(error)}")
        return super().failed(box, error)

    def chunk_key(self, index: tuple[int, ...]) -> str | None:
        """The stored key of chunk ``index`` (zyx): N5 ``x/y/z`` block indices,
        precomputed ``x0-x1_y0-y1_z0-z1`` voxel bounds (unsharded)."""
        prefix = self.keys.get("prefix", "")
        if self.keys.get("style") == "n5":
            return prefix + "/".join(str(i) for i in reversed(index))
        if self.keys.get("style") == "precomputed":
            origin = self.keys["origin"]  # xyz voxel offset
            parts = []
            for axis in (2, 1, 0):
                lo = index[axis] * self.chunks[axis]
                hi = min(lo + self.chunks[axis], self.shape[axis])
                parts.append(f"{origin[2 - axis] + lo}-{origin[2 - axis] + hi}")
            return prefix + "_".join(parts)
        return None


def open_error(path: str, error: Exception, what: str) -> Exception:
    """An error of ``ts.open`` as the one to raise: unreachable -> OSError, else an
    InputError saying the ``what`` is damaged."""
    if unreachable(error):
        return OSError(f"cannot read {path}: {message(error)}")
    return InputError(f"{path} is a damaged {what} ({message(error)}); restore it or re-export it")
