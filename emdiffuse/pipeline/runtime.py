"""Per-process state of the processes that run tasks (Dask workers, or this process).

A worker keeps what it opened between tasks, and between runs: one Enhancer per model
content and device (:func:`get_enhancer`), the opened input (:func:`read_input`) and
output arrays (:func:`open_output`). Every cache is keyed on content identity (DESIGN.md,
"Content, not paths"), so a file replaced at the same path is never served stale.

Also here: the device of this worker (``auto`` or ``cuda`` pick a GPU by the Dask worker's
number, through :func:`emdiffuse.models.device.resolve_device`), torch's threads on a CPU
worker, and glibc's malloc thresholds (:func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from distributed import get_worker

from emdiffuse.errors import InputError
from emdiffuse.io import input_identity as format_identity
from emdiffuse.io import open_volume
from emdiffuse.io.paths import is_url
from emdiffuse.io.regions import backing_array
from emdiffuse.models.checkpoints import read_checkpoint
from emdiffuse.models.device import resolve_device
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.pipeline.lattice import Box
from emdiffuse.pipeline.settings import RunSpec, tile_batch

_LOCK = threading.RLock()
# (sha256, device, precision, compile) -> (path, Enhancer); input key -> (identity, opened input);
# output path -> (metadata bytes, opened array).
_ENHANCERS: dict[tuple, tuple[str, object]] = {}
_INPUTS: dict[tuple, tuple[tuple, object]] = {}
_OUTPUTS: dict[str, tuple[bytes, object]] = {}
_INJECTED: dict[tuple, object] = {}  # an enhancer_factory's Enhancer (see spec_enhancer)
_THREADS_SET = [False]
_TILES_RUN = [0]  # tiles this process has run through a network (all runs, all samples)
_ZARR_META = ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")


# ---- counters --------------------------------------------------------------------------------
def tiles_run() -> int:
    """How many tiles this process has run through a network so far (instrumentation:
    each lattice tile of a run counts once per sample, whatever the chunking)."""
    return _TILES_RUN[0]


def count_tiles(n: int) -> None:
    with _LOCK:
        _TILES_RUN[0] += n


# ---- the process: device, threads, memory ----------------------------------------------------
def _worker_number() -> int | None:
    """The Dask worker's number (a LocalCluster names its workers 0, 1, ...), else None."""
    try:
        name = get_worker().name
    except ValueError:  # not on a Dask worker
        return None
    return int(name) if str(name).isdigit() else None


def worker_device(device: str) -> str:
    """The torch device this process runs ``device`` on: ``auto`` and ``cuda`` take the
    GPU numbered after the Dask worker (one GPU per worker), ``cuda:N`` that one."""
    if device == "cpu":
        return "cpu"
    return str(resolve_device(device, index=_worker_number()))


def _set_torch_threads() -> None:
    """On a Dask worker, give torch as many threads as the worker has (once per process)."""
    if _THREADS_SET[0]:
        return
    _THREADS_SET[0] = True
    try:
        nthreads = get_worker().state.nthreads
    except (ValueError, AttributeError):
        return
    torch.set_num_threads(max(1, int(nthreads)))


# glibc mallopt parameters (malloc.h) and the values set for network work
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 256 << 20
_TRIM_THRESHOLD_BYTES = 512 << 20
_MALLOC_TUNED = [False]


def tune_malloc() -> bool:
    """Keep torch's activation buffers in the heap of this process (glibc only, once).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; setting it disables
    glibc's adaptive mmap threshold, so every tensor over 128 KiB is mmap-ed and unmapped
    again, page-faulting on each touch: a CPU worker then runs the network about 2.5x slower
    than a plain process (``benchmarks/pipeline_efficiency.py``). Raising both thresholds
    makes the buffers reusable; the cost is up to ~0.5 GB of freed memory kept per worker.
    Returns whether the thresholds were set. ``EMDIFFUSE_KEEP_MALLOC=1`` leaves them alone.
    """
    if _MALLOC_TUNED[0]:
        return True
    if os.environ.get("EMDIFFUSE_KEEP_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    _MALLOC_TUNED[0] = ok
    return ok


# ---- the model -------------------------------------------------------------------------------
def get_enhancer(
    checkpoint: str,
    device: str = "cpu",
    precision: str = "auto",
    sha256: str | None = None,
    compile: bool = False,
):
    """The process's Enhancer for ``checkpoint`` on ``device`` (loaded on first use;
    ``compile``: its network evaluated through ``torch.compile``, a separate Enhancer).

    Cached on the content's identity, the sha256 of the bytes loaded, never on the path: a
    file replaced at the same path is loaded anew. ``sha256`` (the run record's hash) asks
    for exactly that content: served from the cache if loaded before, else the file is read
    and refused (InputError) if its bytes no longer hash to it.
    """
    device = worker_device(device)
    path = os.path.abspath(checkpoint)
    with _LOCK:
        if sha256 is not None and (sha256, device, precision, compile) in _ENHANCERS:
            return _ENHANCERS[(sha256, device, precision, compile)][1]
        config, state_dict, digest = read_checkpoint(path)
        if sha256 is not None and digest != sha256:
            raise InputError(
                f"checkpoint {path} changed since the run started (its sha256 is now "
                f"{digest[:12]}…, the run recorded {sha256[:12]}…); start a new run to use it"
            )
        key = (digest, device, precision, compile)
        if key not in _ENHANCERS:
            if device == "cpu":
                _set_torch_threads()
            tune_malloc()
            enhancer = Enhancer.from_config(config, state_dict, device=device, precision=precision,
                                            compile=compile)  # fmt: skip
            for old in [k for k, (p, _) in _ENHANCERS.items() if p == path]:
                del _ENHANCERS[old]  # an older content of this path: free it
            _ENHANCERS[key] = (path, enhancer)
        return _ENHANCERS[key][1]


def spec_enhancer(spec: RunSpec):
    """The Enhancer of ``spec``'s model, settings and recorded hash (:func:`get_enhancer`).

    A spec with an ``enhancer_factory`` gets ``enhancer_factory(spec)`` instead, made once
    per process for each factory (identified by its module and qualified name), checkpoint
    hash, device and precision: an injected Enhancer, e.g. a benchmark's network that costs
    nothing."""
    s = spec.settings
    factory = spec.enhancer_factory
    if factory is None:
        enhancer = get_enhancer(spec.checkpoint, s.device, s.precision, spec.checkpoint_sha256,
                                compile=s.compile)  # fmt: skip
        # compiled: one graph, at the run's batch size
        enhancer.reserve_batch(tile_batch(s.batch_size, enhancer.device.type))
        return enhancer
    name = (getattr(factory, "__module__", None), getattr(factory, "__qualname__", repr(factory)))
    key = (*name, spec.checkpoint_sha256, worker_device(s.device), s.precision)
    with _LOCK:
        if key not in _INJECTED:
            if key[3] == "cpu":
                _set_torch_threads()
            tune_malloc()
            _INJECTED[key] = factory(spec)
        return _INJECTED[key]


# ---- the input -------------------------------------------------------------------------------
def _metadata_bytes(location: str, names) -> bytes:
    """The bytes of the metadata documents ``names`` under the Zarr folder or URL
    ``location``, each followed by a NUL (absent ones count as empty)."""
    parts = []
    for name in names:
        try:
            if is_url(location):
                with fsspec.open(f"{location.rstrip('/')}/{name}", "rb") as handle:
                    parts.append(handle.read())
            else:
                parts.append(Path(location.removeprefix("file://"), name).read_bytes())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            parts.append(b"")
        parts.append(b"\0")
    return b"".join(parts)


def _level_path(group_metadata: bytes, level: int) -> str | None:
    """The path of multiscale ``level`` named in a group's metadata documents, if any."""
    for document in group_metadata.split(b"\0"):
        try:
            attrs = json.loads(document)
            attrs = attrs.get("attributes", attrs)
            return str(attrs.get("ome", attrs)["multiscales"][0]["datasets"][level]["path"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            continue
    return None


def input_identity(path: str, level: int = 0) -> tuple:
    """The identity of the input's content, as far as an opened input depends on it.

    A file (TIFF): device, inode, size and modification time, so a file replaced or
    rewritten at the same path differs. A Zarr: the bytes of the group's metadata and of
    the level array's metadata (shape, chunks, codecs, scale); its chunks are read afresh
    on every access, so the metadata is all that an opened array keeps.
    """
    identity = format_identity(path, level)  # HDF5, N5, precomputed, MRC: the io layer's
    if identity is not None:
        return identity
    local = None if is_url(path) else Path(path.removeprefix("file://"))
    if local is not None and local.is_file():
        st = local.stat()
        return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    group = _metadata_bytes(path, _ZARR_META)
    sub = _level_path(group, level)
    array = b"" if sub is None else _metadata_bytes(f"{path.rstrip('/')}/{sub}", _ZARR_META)
    return ("zarr", group, array)


def _open_input(spec: RunSpec):
    """The run's input ``(volume, backing zarr array or None)``, opened once per process
    for each state of its content (:func:`input_identity`)."""
    key = (spec.input_path, spec.input_level, spec.input_voxel_size, spec.input_ndim)
    identity = input_identity(spec.input_path, spec.input_level)
    with _LOCK:
        cached = _INPUTS.get(key)
        if cached is None or cached[0] != identity:
            volume = open_volume(
                spec.input_path,
                level=spec.input_level,
                voxel_size=spec.input_voxel_size,
                ndim=spec.input_ndim,
            )
            cached = (identity, (volume, backing_array(volume.data)))
            _INPUTS[key] = cached  # replaces the entry of an older content
        return cached[1]


def read_input(spec: RunSpec, box: Box) -> np.ndarray:
    """Input region ``box`` (zyx, input grid) as a numpy array, read straight from the store.

    Only the store chunks that intersect ``box`` are read, synchronously in this task.
    """
    volume, backing = _open_input(spec)
    slices = tuple(slice(a, b) for a, b in box)
    if spec.input_ndim == 2:
        slices = slices[1:]
    try:  # a damaged chunk is an InputError naming it (the opened array checks every read)
        if backing is not None:
            block = backing[slices]
        else:
            block = volume.data[slices]
            if hasattr(block, "compute"):
                block = block.compute(scheduler="sync")
    except InputError:
        worker_log = logging.getLogger("distributed.worker")
        if _drop_input_errors not in worker_log.filters:
            worker_log.addFilter(_drop_input_errors)
        raise
    block = np.asarray(block)
    return block[None] if spec.input_ndim == 2 else block


def _drop_input_errors(record: logging.LogRecord) -> bool:
    """Logging filter for Dask workers: no "Compute Failed" report of an InputError (the
    client re-raises it and the CLI prints it on one line; the worker's copy is ~10 more)."""
    args = record.args if isinstance(record.args, tuple) else ()
    failed = str(record.msg).startswith("Compute Failed")
    return not (failed and any(str(a).startswith("InputError(") for a in args))


# ---- the output ------------------------------------------------------------------------------
def open_output(path: str):
    """The output array ``path/0`` opened for writing, once per process for each state of
    its metadata (an output overwritten at the same path with another shape or chunking is
    opened anew)."""
    identity = _metadata_bytes(f"{path}/0", _ZARR_META)
    with _LOCK:
        cached = _OUTPUTS.get(path)
        if cached is None or cached[0] != identity:
            cached = (identity, zarr.open_array(f"{path}/0", mode="r+"))
            _OUTPUTS[path] = cached
        return cached[1]
