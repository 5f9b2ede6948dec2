"""What runs inside the tasks: run each tile once, blend chunks from the tiles, write.

Two task kinds (see :mod:`emdiffuse.pipeline.graph`). :func:`produce_block` runs the tiles
one block of the chunk grid *owns* (:class:`~emdiffuse.pipeline.lattice.Ownership`: each
lattice tile has exactly one owner, so no tile runs twice however many chunks it overlaps)
and returns their window-weighted sums cut to the chunks they reach. :func:`run_chunk` adds
the sums of its source blocks, divides by the summed windows, writes its region of the
output and marks the chunk done.

Everything a task needs travels in a small :class:`RunSpec` (paths and numbers, no arrays);
the tasks open the input and output stores themselves and keep one Enhancer per process
(:func:`get_enhancer`), so a worker loads a model once whatever the number of tasks.
:func:`run_in_process` loops over the same functions with no Dask and no Zarr writes (the
reference for benchmarks and tests); :func:`compute_chunk` is the self-contained form for
one chunk (all its tiles, nothing shared).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.normalization import Normalization, to_dtype
from emdiffuse.models.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS
from emdiffuse.pipeline.blend import Accumulator, window_2d
from emdiffuse.pipeline.lattice import Box, Lattice, Ownership, Tile, chunk_box
from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise
from emdiffuse.pipeline.run_record import mark_done


@dataclass(frozen=True)
class RunSpec:
    """Everything one chunk task needs (picklable, small)."""

    input_path: str
    input_level: int
    input_voxel_size: tuple[float, ...] | None
    input_ndim: int  # 2 (yx, run as one z slice) or 3
    checkpoint: str
    device: str  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str
    lattice: Lattice
    chunks: tuple[int, int, int]  # output chunk shape (zyx; z is 1 for 2D output)
    output_path: str
    normalization: Normalization
    dtype: str
    seed: int = 0
    steps: int = DEFAULT_STEPS
    samples: int = 1
    sampler: str = DEFAULT_SAMPLER
    batch_size: int = 4
    spacing: str | None = None  # the sampler's step spacing (None: its default)
    checkpoint_sha256: str | None = None  # the run record's hash: workers load exactly this
    extra: dict = field(default_factory=dict)

    @property
    def uncertainty_path(self) -> str:
        return f"{self.output_path}/uncertainty"


# ---- per-process caches -------------------------------------------------------------------
_LOCK = threading.RLock()
# Every cache is keyed on content identity (DESIGN.md, "Content, not paths"):
# (sha256, device, precision) -> (path, Enhancer); input key -> (identity, opened input);
# output path -> (metadata bytes, opened array).
_ENHANCERS: dict[tuple, tuple[str, object]] = {}
_INPUTS: dict[tuple, tuple[tuple, object]] = {}
_OUTPUTS: dict[str, tuple[bytes, object]] = {}
_THREADS_SET = False
_TILES_RUN = [0]  # tiles this process has run through a network (all runs, all samples)


def tiles_run() -> int:
    """How many tiles this process has run through a network so far (instrumentation:
    each lattice tile of a run counts once per sample, whatever the chunking)."""
    return _TILES_RUN[0]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:<i>`` (i from the Dask worker's name when several GPUs) or ``cpu``."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) % count if str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index}"


def _set_torch_threads() -> None:
    """On a Dask worker, give torch as many threads as the worker has (once per process)."""
    global _THREADS_SET
    if _THREADS_SET:
        return
    _THREADS_SET = True
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    import torch

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
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    _MALLOC_TUNED[0] = ok
    return ok


def get_enhancer(
    checkpoint: str, device: str = "cpu", precision: str = "auto", sha256: str | None = None
):
    """The process's Enhancer for ``checkpoint`` on ``device`` (loaded on first use).

    Cached on the content's identity, the sha256 of the bytes loaded, never on the path: a
    file replaced at the same path is loaded anew. ``sha256`` (the run record's hash) asks
    for exactly that content: served from the cache if loaded before, else the file is read
    and refused (InputError) if its bytes no longer hash to it.
    """
    device = resolve_device(device)
    path = os.path.abspath(checkpoint)
    with _LOCK:
        if sha256 is not None and (sha256, device, precision) in _ENHANCERS:
            return _ENHANCERS[(sha256, device, precision)][1]
        from emdiffuse.errors import InputError
        from emdiffuse.models.checkpoints import read_checkpoint

        config, state_dict, digest = read_checkpoint(path)
        if sha256 is not None and digest != sha256:
            raise InputError(
                f"checkpoint {path} changed since the run started (its sha256 is now "
                f"{digest[:12]}…, the run recorded {sha256[:12]}…); start a new run to use it"
            )
        key = (digest, device, precision)
        if key not in _ENHANCERS:
            if device == "cpu":
                _set_torch_threads()
            tune_malloc()
            from emdiffuse.models.enhancer import Enhancer

            enhancer = Enhancer.from_config(config, state_dict, device=device, precision=precision)
            for old in [k for k, (p, _) in _ENHANCERS.items() if p == path]:
                del _ENHANCERS[old]  # an older content of this path: free it
            _ENHANCERS[key] = (path, enhancer)
        return _ENHANCERS[key][1]


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _metadata_bytes(location: str, names: Sequence[str]) -> bytes:
    """The bytes of the metadata documents ``names`` under the Zarr folder or URL
    ``location``, each followed by a NUL (absent ones count as empty)."""
    parts = []
    for name in names:
        try:
            if _is_url(location):
                import fsspec

                with fsspec.open(f"{location.rstrip('/')}/{name}", "rb") as handle:
                    parts.append(handle.read())
            else:
                parts.append(Path(location.removeprefix("file://"), name).read_bytes())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            parts.append(b"")
        parts.append(b"\0")
    return b"".join(parts)


_ZARR_META = ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")


def _level_path(group_metadata: bytes, level: int) -> str | None:
    """The path of multiscale ``level`` named in a group's metadata documents, if any."""
    import json

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
    local = None if _is_url(path) else Path(path.removeprefix("file://"))
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
            from emdiffuse.io import open_volume

            volume = open_volume(
                spec.input_path,
                level=spec.input_level,
                voxel_size=spec.input_voxel_size,
                ndim=spec.input_ndim,
            )
            cached = (identity, (volume, backing_array(volume.data)))
            _INPUTS[key] = cached  # replaces the entry of an older content
        return cached[1]


def backing_array(data):
    """The (read-only) zarr array that the dask array ``data`` reads whole — what
    ``dask.array.from_zarr`` wraps — or None when ``data`` is anything else (sliced,
    squeezed, computed). Reading a region from it directly skips building and running a
    dask graph per read (about 10 ms a task on a 2-core machine)."""
    import zarr

    graph = data.__dask_graph__()
    layers = getattr(graph, "layers", None) or {"": graph}
    for name, layer in layers.items():
        if not str(name).startswith("original-"):
            continue
        for value in layer.values():
            if (
                isinstance(value, zarr.Array)
                and tuple(value.shape) == tuple(data.shape)
                and value.dtype == data.dtype
            ):
                return value
    return None


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


def _open_output(path: str):
    """The output array ``path/0`` opened for writing, once per process for each state of
    its metadata (an output overwritten at the same path with another shape or chunking is
    opened anew)."""
    identity = _metadata_bytes(f"{path}/0", _ZARR_META)
    with _LOCK:
        cached = _OUTPUTS.get(path)
        if cached is None or cached[0] != identity:
            import zarr

            cached = (identity, zarr.open_array(f"{path}/0", mode="r+"))
            _OUTPUTS[path] = cached
        return cached[1]


# ---- the pure core ------------------------------------------------------------------------
def _tile_condition(lattice: Lattice, tile: Tile, region: np.ndarray, read_box: Box) -> np.ndarray:
    """A tile's conditioning (in_slices, t, t) cut from the read region, padded by
    reflection where the volume is smaller than a tile."""
    box = lattice.tile_input_box(tile)
    sl = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(box, read_box, strict=True))
    cond = region[sl]
    t = lattice.tile // lattice.xy_scale
    pad_y, pad_x = t - cond.shape[1], t - cond.shape[2]
    if pad_y or pad_x:
        cond = np.pad(cond, ((0, 0), (0, pad_y), (0, pad_x)), mode="symmetric")
    return cond


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_tiles(
    spec: RunSpec,
    enhancer,
    tiles: Sequence[Tile],
    cond_region: np.ndarray,
    read_box: Box,
    sample: int,
) -> Iterator[tuple[Sequence[Tile], np.ndarray]]:
    """Run ``tiles`` (one sample) in batches of ``spec.batch_size``: yields ``(batch, out)``
    with ``out`` (len(batch), out_slices, T, T) float32 in model space.

    ``cond_region`` is the normalised input over ``read_box``. A tile's noise is keyed on
    its global origin, so its output does not depend on the batch it runs in (up to the
    float rounding of batched kernels)."""
    lattice = spec.lattice
    T = lattice.tile
    noise_shape = (lattice.tile_output_slices, T, T)
    for batch in _batches(tiles, max(1, spec.batch_size)):
        cond = np.stack([_tile_condition(lattice, t, cond_region, read_box) for t in batch])
        origins = [lattice.tile_origin(t) for t in batch]
        noise = np.stack(
            [tile_noise(spec.seed, sample, o, INITIAL_STEP, noise_shape) for o in origins]
        )

        def step_noise(step: int, origins=origins, sample=sample, shape=noise_shape):
            return np.stack([tile_noise(spec.seed, sample, o, step, shape) for o in origins])

        out = enhancer.enhance(
            cond.astype(np.float32),
            noise,
            sampler=spec.sampler,
            steps=spec.steps,
            step_noise=step_noise,
            spacing=spec.spacing,
        )
        with _LOCK:
            _TILES_RUN[0] += len(batch)
        yield batch, np.asarray(out, dtype=np.float32)


def compute_chunk(
    spec: RunSpec, index: tuple[int, int, int], enhancer, region: np.ndarray | None, read_box
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Blend one output chunk from its input ``region`` (raw units, covering ``read_box``),
    running every tile that touches it here (no sharing with other chunks).

    Returns ``(mean in raw units as float64, std in raw units or None, tiles run)``. The
    pipeline computes the same values with each tile run once (:func:`produce_block`,
    :func:`blend_chunk`); this is the self-contained form.
    """
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.chunks)
    tiles = lattice.tiles_in(box)
    norm = spec.normalization
    window = window_2d(lattice.tile, lattice.overlap)
    shape = tuple(b - a for a, b in box)
    totals = np.zeros((spec.samples, *shape))
    cond_region = np.clip(norm.forward(region), -1.0, 1.0) if tiles else None
    for sample in range(spec.samples):
        acc = Accumulator(box)
        for batch, out in run_tiles(spec, enhancer, tiles, cond_region, read_box, sample):
            for tile, values in zip(batch, out, strict=True):
                acc.add(lattice.tile_output_box(tile), values, window)
        totals[sample] = acc.total
    mean, std = _finish(spec, box, totals, chunk_weight(lattice, box), region, read_box)
    return mean, std, len(tiles)


def chunk_weight(lattice: Lattice, box: Box) -> np.ndarray:
    """Summed blend weights over output ``box`` (dz, dy, dx) float64: the windows of all
    lattice tiles covering each voxel; 0 where the model writes nothing (kept slices)."""
    (z0, z1), (y0, y1), (x0, x1) = box
    window = window_2d(lattice.tile, lattice.overlap)
    plane = np.zeros((y1 - y0, x1 - x0))
    xs = [lattice.x.output_extent(i) for i in lattice.x.tiles_between(x0, x1)]
    for iy in lattice.y.tiles_between(y0, y1):
        ta, tb = lattice.y.output_extent(iy)
        ly, hy = max(y0, ta), min(y1, tb)
        for ua, ub in xs:
            lx, hx = max(x0, ua), min(x1, ub)
            plane[ly - y0 : hy - y0, lx - x0 : hx - x0] += window[
                ly - ta : hy - ta, lx - ua : hx - ua
            ]
    rows = np.zeros(z1 - z0)
    for unit in lattice.units_between(z0, z1):
        a, b = lattice.unit_output_z(unit)
        rows[max(a, z0) - z0 : min(b, z1) - z0] = 1.0
    return rows[:, None, None] * plane[None]


def _finish(
    spec: RunSpec,
    box: Box,
    totals: np.ndarray,
    weight: np.ndarray,
    kept_region: np.ndarray | None,
    kept_box: Box | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted totals (samples, dz, dy, dx) in model space -> (mean, std or None) in raw
    units; the kept original slices (isotropic) are copied from ``kept_region``."""
    norm = spec.normalization
    covered = weight > 0
    safe = np.where(covered, weight, 1.0)
    blends = np.where(covered, totals / safe, 0.0)  # uncovered voxels: 0, replaced below
    mean_model = blends.sum(axis=0) / spec.samples
    mean = norm.inverse(mean_model)
    std = None
    if spec.samples > 1:
        var = np.maximum((blends**2).sum(axis=0) / spec.samples - mean_model**2, 0.0)
        std = norm.scale_std(np.sqrt(var))
    (z0, z1), (y0, y1), (x0, x1) = box
    for z_out, z_in in spec.lattice.kept_slices(z0, z1):
        rz, ry, rx = (a for a, _ in kept_box)
        mean[z_out - z0] = kept_region[z_in - rz, y0 - ry : y1 - ry, x0 - rx : x1 - rx]
        if std is not None:
            std[z_out - z0] = 0.0
    return mean, std


@lru_cache(maxsize=32)
def ownership(lattice: Lattice, chunks: tuple[int, int, int]) -> Ownership:
    """The (cached) :class:`Ownership` of a run's tiles by its chunk grid."""
    return Ownership(lattice, tuple(chunks))


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(p, q), min(r, s)) for (p, r), (q, s) in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


def _add_weighted(dst: np.ndarray, dst_box: Box, tile_box: Box, values, window) -> None:
    """``dst[box ∩ tile] += values * window`` (values on the tile's box, padding ignored)."""
    inter = _intersect(dst_box, tile_box)
    if inter is None:
        return
    d = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, dst_box, strict=True))
    s = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, tile_box, strict=True))
    dst[d] += values[s] * window[s[1], s[2]]


def produce_block(
    spec: RunSpec,
    block: tuple[int, int, int],
    targets: Sequence[tuple[int, int, int]],
    *,
    enhancer=None,
) -> dict:
    """One Dask task: run every tile block ``block`` owns (each tile of the run is owned by
    exactly one block) and return their window-weighted sums over each target chunk.

    Returns ``{"block", "pieces": {chunk index: (box, float32 (samples, dz, dy, dx))},
    "tiles", "seconds"}``; a piece covers only the part of the chunk those tiles reach.
    All owned tiles run whatever the targets (a resumed run batches them as the first run
    did, so it writes the same bytes).
    """
    start = time.perf_counter()
    lattice = spec.lattice
    tiles = ownership(lattice, spec.chunks).owned_tiles(tuple(block))
    reach = lattice.output_box_of(tiles)
    pieces: dict = {}
    if tiles:
        for index in targets:
            inter = _intersect(chunk_box(index, lattice.output_shape, spec.chunks), reach)
            if inter is not None:
                shape = (spec.samples, *(b - a for a, b in inter))
                pieces[tuple(index)] = (inter, np.zeros(shape, dtype=np.float32))
    if pieces:
        read_box = lattice.input_box_of(tiles)
        region = read_input(spec, read_box)
        cond_region = np.clip(spec.normalization.forward(region), -1.0, 1.0)
        if enhancer is None:
            enhancer = get_enhancer(
                spec.checkpoint, spec.device, spec.precision, spec.checkpoint_sha256
            )
        window = window_2d(lattice.tile, lattice.overlap)
        for sample in range(spec.samples):
            for batch, out in run_tiles(spec, enhancer, tiles, cond_region, read_box, sample):
                for tile, values in zip(batch, out, strict=True):
                    tile_box = lattice.tile_output_box(tile)
                    for box, total in pieces.values():
                        _add_weighted(total[sample], box, tile_box, values, window)
    return {
        "block": tuple(block),
        "pieces": pieces,
        "tiles": len(tiles) if pieces else 0,
        "seconds": time.perf_counter() - start,
    }


def blend_chunk(
    spec: RunSpec, index: tuple[int, int, int], parts: Sequence[dict]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Chunk ``index`` from the :func:`produce_block` results of its source blocks:
    ``(mean in raw units as float64, std in raw units or None)``. Parts are summed in the
    order given (the graph gives them in block order, so a rerun adds in the same order)."""
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.chunks)
    shape = tuple(b - a for a, b in box)
    totals = np.zeros((spec.samples, *shape))
    for part in parts:
        piece = part["pieces"].get(tuple(index))
        if piece is None:
            continue
        pbox, values = piece
        sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(pbox, box, strict=True))
        totals[(slice(None), *sl)] += values
    kept_region = kept_box = None
    kept = lattice.kept_slices(*box[0])
    if kept:
        (y0, y1), (x0, x1) = box[1], box[2]
        kept_box = ((kept[0][1], kept[-1][1] + 1), (y0, y1), (x0, x1))
        kept_region = read_input(spec, kept_box)
    return _finish(spec, box, totals, chunk_weight(lattice, box), kept_region, kept_box)


def run_chunk(spec: RunSpec, index: tuple[int, int, int], *parts: dict) -> dict:
    """One Dask task: blend output chunk ``index`` from its source blocks' ``parts`` (see
    :func:`produce_block`), write it and mark it done. Idempotent (a retried task writes
    the same bytes)."""
    start = time.perf_counter()
    hook = spec.extra.get("chunk_hook")
    if hook is not None:
        hook(index)
    box = chunk_box(index, spec.lattice.output_shape, spec.chunks)
    mean, std = blend_chunk(spec, index, parts)
    _write(spec.output_path, box, to_dtype(mean, spec.dtype), spec.input_ndim)
    if std is not None:
        _write(spec.uncertainty_path, box, std.astype(np.float32), spec.input_ndim)
    mark_done(spec.output_path, index)
    return {
        "index": tuple(index),
        "tiles": len(spec.lattice.tiles_in(box)),
        "seconds": time.perf_counter() - start,
    }


def _write(path: str, box: Box, block: np.ndarray, ndim: int) -> None:
    array = _open_output(path)
    slices = tuple(slice(a, b) for a, b in box)
    if ndim == 2:
        array[slices[1:]] = block[0]
    else:
        array[slices] = block


def run_in_process(
    spec: RunSpec,
    indices: Sequence[tuple[int, int, int]] | None = None,
    *,
    enhancer=None,
    on_chunk: Callable[[tuple, np.ndarray], None] | None = None,
) -> dict:
    """Run the chunks in a plain loop in this process — no Dask, no Zarr writes.

    The same reads, tiles (each run once), batches and blending as the pipeline, in chunk
    order; a block's tiles are dropped once every chunk that needs them is blended.
    ``on_chunk(index, mean)`` receives each blended chunk. Returns ``{"seconds", "tiles",
    "chunks"}``: the in-process baseline the pipeline's efficiency is measured against.
    """
    from emdiffuse.pipeline.lattice import iter_chunks

    lattice = spec.lattice
    if indices is None:
        indices = list(iter_chunks(lattice.output_shape, spec.chunks))
    indices = [tuple(int(i) for i in index) for index in indices]
    if enhancer is None:
        enhancer = get_enhancer(
            spec.checkpoint, spec.device, spec.precision, spec.checkpoint_sha256
        )
    start = time.perf_counter()
    plan = block_plan(spec, indices)
    consumers: dict = {}
    for index in indices:
        for block in plan.sources[index]:
            consumers[block] = consumers.get(block, 0) + 1
    parts: dict = {}
    tiles = 0
    for index in indices:
        for block in plan.sources[index]:
            if block not in parts:
                parts[block] = produce_block(spec, block, plan.targets[block], enhancer=enhancer)
                tiles += parts[block]["tiles"]
        mean, _ = blend_chunk(spec, index, [parts[b] for b in plan.sources[index]])
        for block in plan.sources[index]:
            consumers[block] -= 1
            if not consumers[block]:
                del parts[block]
        if on_chunk is not None:
            on_chunk(index, mean)
    return {"seconds": time.perf_counter() - start, "tiles": tiles, "chunks": len(indices)}


@dataclass(frozen=True)
class BlockPlan:
    """Which blocks a set of chunks needs: ``sources[chunk]`` (blocks, in order) and
    ``targets[block]`` (the chunks of the set it feeds, in order)."""

    sources: dict
    targets: dict


def block_plan(spec: RunSpec, indices: Sequence[tuple[int, int, int]]) -> BlockPlan:
    """The blocks that chunks ``indices`` need, and the chunks each block feeds."""
    own = ownership(spec.lattice, spec.chunks)
    sources: dict = {}
    targets: dict = {}
    for index in indices:
        index = tuple(int(i) for i in index)
        blocks = own.sources(index)
        sources[index] = blocks
        for block in blocks:
            targets.setdefault(block, []).append(index)
    return BlockPlan(sources, {b: tuple(t) for b, t in targets.items()})
