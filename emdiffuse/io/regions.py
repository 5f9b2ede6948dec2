"""Region readers: the lazy, picklable arrays behind the HDF5, N5, precomputed and MRC inputs.

A :class:`RegionReader` is what ``dask.array.from_array`` wraps and what the pipeline's tasks
and the training loader slice directly (``reader[z0:z1, y0:y1, x0:x1]`` -> numpy, zyx). It
holds only what opens its array again — a path, a dataset name, a tensorstore spec — and a
``token`` of the content it was opened for (file size and mtime, or the metadata's bytes),
so it pickles to Dask worker processes and training-loader workers; each process opens the
array once per content (:func:`handle`, an LRU of open handles keyed on the token) and a
file replaced at the same path is opened afresh (DESIGN.md, "Content, not paths").

As :mod:`~emdiffuse.io.damaged` does for Zarr, a read that fails is an
:class:`~emdiffuse.errors.InputError` naming the first chunk that fails on its own (and its
stored key, where the format has one), wherever the read runs.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

import dask.array as da
import numpy as np
import zarr

from emdiffuse.errors import InputError

INSTALL_FORMATS = "pip install 'emdiffuse[formats]'"
_LOCK = threading.RLock()
_HANDLES: OrderedDict[tuple, object] = OrderedDict()
_MAX_HANDLES = 16


def _forget_handles() -> None:
    _HANDLES.clear()  # a forked child opens its own (h5py and tensorstore handles do not fork)


os.register_at_fork(after_in_child=_forget_handles)


def require(module: str, what: str):
    """``import module``, or a one-line InputError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"reading {what} needs the Python package {module}, which is not installed: "
            f"{INSTALL_FORMATS}"
        ) from None


def one_line(error: BaseException) -> str:
    """``Type: message`` of ``error`` on one line."""
    return " ".join(f"{type(error).__name__}: {error}".split())


class RegionReader:
    """A stored array read region by region, zyx (or yx), opened lazily in each process.

    Subclasses set ``kind`` and implement :meth:`open` (the process's handle), :meth:`read`
    (a region of storage as numpy) and, where chunks have names, :meth:`chunk_key`.
    ``perm`` maps each axis of this reader to an axis of the stored array and ``fixed``
    gives the index taken along stored axes that are dropped (singleton channels).
    """

    kind = "array"

    def __init__(
        self,
        label: str,
        shape: Sequence[int],
        dtype,
        chunks: Sequence[int],
        token,
        *,
        perm: Sequence[int] | None = None,
        fixed: dict[int, int] | None = None,
    ) -> None:
        self.label = label
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype).newbyteorder("=")
        self.chunks = tuple(max(1, min(int(c), s)) if s else 1 for c, s in zip(chunks, self.shape, strict=True))
        self.token = token
        self.perm = tuple(range(len(self.shape))) if perm is None else tuple(perm)
        self.fixed = dict(fixed or {})

    # ---- what subclasses provide ---------------------------------------------------------
    def open(self):
        """The handle this process reads through (a file, a dataset, a TensorStore)."""
        raise NotImplementedError

    def read(self, handle, selection: tuple) -> np.ndarray:
        """The stored array's ``selection`` (one slice or int per stored axis) as numpy."""
        return np.asarray(handle[selection])

    def chunk_key(self, index: tuple[int, ...]) -> str | None:
        """The stored name of chunk ``index`` (this reader's axes), if it has one."""
        return None

    def location(self) -> tuple:
        """What identifies the stored array apart from its content token."""
        return (self.label,)

    # ---- the array protocol (dask.array.from_array, ChunkReader, the pipeline) -----------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __dask_tokenize__(self):
        return (type(self).__name__, self.location(), self.token, self.perm, sorted(self.fixed.items()))

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def handle(self):
        """This process's open handle for this content (opened once, LRU of 16)."""
        key = (type(self).__name__, self.location(), self.token)
        with _LOCK:
            if key in _HANDLES:
                _HANDLES.move_to_end(key)
                return _HANDLES[key]
        opened = self.open()
        with _LOCK:
            _HANDLES[key] = opened
            while len(_HANDLES) > _MAX_HANDLES:
                _HANDLES.popitem(last=False)
        return opened

    def __getitem__(self, selection) -> np.ndarray:
        box, squeeze = _box(selection, self.shape)
        if any(b <= a for a, b in box):
            out = np.empty([b - a for a, b in box], self.dtype)
            return out[tuple(0 if s else slice(None) for s in squeeze)]
        try:
            out = self._read_box(self.handle(), box)
        except (InputError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise self.failed(box, error) from None
        return out[tuple(0 if s else slice(None) for s in squeeze)]

    def _read_box(self, handle, box: list[tuple[int, int]]) -> np.ndarray:
        stored = len(self.perm) + len(self.fixed)
        selection: list = [None] * stored
        for axis, (a, b) in zip(self.perm, box, strict=True):
            selection[axis] = slice(a, b)
        for axis, index in self.fixed.items():
            selection[axis] = index
        block = self.read(handle, tuple(selection))
        kept = [axis for axis in range(stored) if axis not in self.fixed]
        order = [kept.index(axis) for axis in self.perm]
        if order != list(range(len(order))):
            block = np.transpose(block, order)
        return np.ascontiguousarray(block, dtype=self.dtype)

    # ---- failures ------------------------------------------------------------------------
    def reason(self, error: BaseException) -> str:
        """``error`` on one line, for messages."""
        return one_line(error)

    def is_damage(self, error: Exception) -> bool:
        """Whether ``error`` says the stored data are damaged (not: the system failed)."""
        return not (isinstance(error, OSError) and error.errno is not None)

    def failed(self, box: list[tuple[int, int]], error: Exception) -> Exception:
        """The error to raise for a failed read of ``box``: an InputError naming the first
        chunk that fails on its own when the data are damaged, else ``error`` itself."""
        if not self.is_damage(error):
            return error
        ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, self.chunks, strict=True)]
        index = None
        handle = None
        for candidate in itertools.product(*ranges):
            region = [
                (i * c, min((i + 1) * c, n)) for i, c, n in zip(candidate, self.chunks, self.shape, strict=True)
            ]
            try:
                handle = handle or self.handle()
                self._read_box(handle, region)
            except Exception:
                index = candidate
                break
        reason = self.reason(error)
        if index is None:  # no chunk fails alone: the region as a whole could not be read
            where = "the region " + ", ".join(f"{a}:{b}" for a, b in box)
        else:
            where = f"chunk {index}"
            key = self.chunk_key(index)
            if key:
                where += f" (stored as {key})"
        return InputError(
            f"{self.label}: {where} cannot be read ({reason}); the input is damaged: "
            "restore it from a good copy (or re-export it) and run again"
        )

    def to_dask(self) -> da.Array:
        """This reader as a lazy dask array, one dask chunk per stored chunk."""
        name = f"{self.kind}-{da.core.tokenize(self)}"
        return da.from_array(
            self, chunks=self.chunks, name=name, meta=np.empty((0,) * self.ndim, self.dtype)
        )


def _box(selection, shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], list[bool]]:
    """``selection`` (ints, unit-step slices, Ellipsis) as (start, stop) per axis and which
    axes an int dropped; anything else (fancy indexing, steps) is refused."""
    items = list(selection) if isinstance(selection, tuple) else [selection]
    if any(item is Ellipsis for item in items):
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        raise IndexError(f"too many indices ({len(items)}) for an array of shape {shape}")
    items += [slice(None)] * (len(shape) - len(items))
    box, squeeze = [], []
    for item, n in zip(items, shape, strict=True):
        if isinstance(item, slice) and item.step in (None, 1):
            start, stop, _ = item.indices(n)
            box.append((start, max(start, stop)))
            squeeze.append(False)
        elif isinstance(item, int | np.integer):
            i = int(item) + (n if item < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(item)} is out of bounds for an axis of size {n}")
            box.append((i, i + 1))
            squeeze.append(True)
        else:
            raise TypeError(f"region readers take ints and unit-step slices, not {item!r}")
    return box, squeeze


def backing_array(data, kinds: tuple[type, ...] | None = None):
    """The array a dask array reads whole — the zarr array ``dask.array.from_zarr`` wraps, or
    the :class:`RegionReader` of :meth:`RegionReader.to_dask` (``kinds`` narrows the choice)
    — or None when ``data`` is anything else (sliced, rechunked, computed). Reading a region
    from it directly skips building and running a dask graph per read (about 10 ms a task
    on a 2-core machine)."""
    kinds = (zarr.Array, RegionReader) if kinds is None else kinds
    graph = data.__dask_graph__()
    layers = getattr(graph, "layers", None) or {"": graph}
    for name, layer in layers.items():
        if not str(name).startswith("original-"):
            continue
        for value in layer.values():
            if (
                isinstance(value, kinds)
                and tuple(value.shape) == tuple(data.shape)
                and value.dtype == data.dtype
            ):
                return value
    return None


def backing_reader(data) -> RegionReader | None:
    """:func:`backing_array` when it is a :class:`RegionReader` (HDF5, N5, precomputed,
    MRC), else None."""
    return backing_array(data, (RegionReader,))


def worker_start_method() -> str | None:
    """How worker processes of a loader must start to read the inputs opened so far:
    ``"spawn"`` once tensorstore (N5, precomputed) is loaded — it aborts a forked child
    that uses it — else None (the platform's default)."""
    return "spawn" if "tensorstore" in sys.modules else None


def dask_chunks(shape: Sequence[int], stored: Sequence[int] | None, itemsize: int) -> tuple[int, ...]:
    """Chunks for an array stored with ``stored`` chunks (None: contiguous, e.g. an
    unchunked HDF5 dataset or an MRC file): those, or blocks of about 8 MiB of whole
    rows for contiguous data (reading any region of those is cheap)."""
    if stored is not None:
        return tuple(max(1, min(int(c), int(s))) for c, s in zip(stored, shape, strict=True))
    shape = [int(s) for s in shape]
    if len(shape) == 1:
        return (max(1, shape[0]),)
    rows = [min(s, 512) for s in shape[-2:]]
    plane = max(1, rows[0] * rows[1] * itemsize)
    depth = [max(1, min(s, (8 << 20) // plane)) for s in shape[:-2]]
    return tuple(max(1, c) for c in (*depth, *rows))


__all__ = [
    "INSTALL_FORMATS",
    "RegionReader",
    "backing_array",
    "backing_reader",
    "dask_chunks",
    "one_line",
    "require",
    "worker_start_method",
]
