"""What runs inside one task: read a chunk's input region, run its tiles, blend, write.

Everything a task needs travels in a small :class:`RunSpec` (paths and numbers, no arrays);
the task opens the input and output stores itself and keeps one Enhancer per process
(:func:`get_enhancer`), so a worker loads a model once whatever the number of tasks.
:func:`compute_chunk` is the pure core (input region in, blended output out); it is also
what :func:`run_in_process` loops over, with no Dask and no Zarr writes (the reference for
benchmarks and tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from emdiffuse.pipeline.blend import Accumulator, window_2d
from emdiffuse.pipeline.lattice import Box, Lattice, Tile, chunk_box
from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise
from emdiffuse.pipeline.normalize import Normalization, to_dtype
from emdiffuse.pipeline.resume import mark_done


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
    steps: int = 8
    samples: int = 1
    sampler: str = "dpmpp_2m"
    batch_size: int = 4
    extra: dict = field(default_factory=dict)

    @property
    def uncertainty_path(self) -> str:
        return f"{self.output_path}/uncertainty"


# ---- per-process caches -------------------------------------------------------------------
_LOCK = threading.RLock()
_ENHANCERS: dict[tuple, object] = {}
_INPUTS: dict[tuple, object] = {}
_OUTPUTS: dict[str, object] = {}
_THREADS_SET = False


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


def get_enhancer(checkpoint: str, device: str = "cpu", precision: str = "auto"):
    """The process's Enhancer for ``checkpoint`` on ``device`` (loaded on first use)."""
    device = resolve_device(device)
    key = (os.path.abspath(checkpoint), device, precision)
    with _LOCK:
        enhancer = _ENHANCERS.get(key)
        if enhancer is None:
            if device == "cpu":
                _set_torch_threads()
            from emdiffuse.models.enhancer import Enhancer

            enhancer = Enhancer.load(checkpoint, device=device, precision=precision)
            _ENHANCERS[key] = enhancer
        return enhancer


def _open_input(spec: RunSpec):
    key = (spec.input_path, spec.input_level, spec.input_voxel_size, spec.input_ndim)
    with _LOCK:
        volume = _INPUTS.get(key)
        if volume is None:
            from emdiffuse.pipeline.io import open_volume

            volume = open_volume(
                spec.input_path,
                level=spec.input_level,
                voxel_size=spec.input_voxel_size,
                ndim=spec.input_ndim,
            )
            _INPUTS[key] = volume
        return volume


def read_input(spec: RunSpec, box: Box) -> np.ndarray:
    """Input region ``box`` (zyx, input grid) as a numpy array, read straight from the store.

    Only the store chunks that intersect ``box`` are read, synchronously in this task.
    """
    volume = _open_input(spec)
    data = volume.data
    slices = tuple(slice(a, b) for a, b in box)
    if spec.input_ndim == 2:
        block = data[slices[1:]]
    else:
        block = data[slices]
    if hasattr(block, "compute"):
        block = block.compute(scheduler="sync")
    block = np.asarray(block)
    return block[None] if spec.input_ndim == 2 else block


def _open_output(path: str):
    with _LOCK:
        array = _OUTPUTS.get(path)
        if array is None:
            import zarr

            array = zarr.open_array(f"{path}/0", mode="r+")
            _OUTPUTS[path] = array
        return array


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


def compute_chunk(
    spec: RunSpec, index: tuple[int, int, int], enhancer, region: np.ndarray | None, read_box
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Blend one output chunk from its input ``region`` (raw units, covering ``read_box``).

    Returns ``(mean in raw units as float64, std in raw units or None, tiles run)``.
    """
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.chunks)
    tiles = lattice.tiles_in(box)
    norm = spec.normalization
    T = lattice.tile
    window = window_2d(T, lattice.overlap)
    out_slices = lattice.tile_output_slices
    shape = tuple(b - a for a, b in box)
    total = np.zeros(shape)
    squares = np.zeros(shape) if spec.samples > 1 else None
    cond_region = np.clip(norm.forward(region), -1.0, 1.0) if tiles else None
    for sample in range(spec.samples):
        acc = Accumulator(box)
        for batch in _batches(tiles, max(1, spec.batch_size)):
            cond = np.stack([_tile_condition(lattice, t, cond_region, read_box) for t in batch])
            origins = [lattice.tile_origin(t) for t in batch]
            noise_shape = (out_slices, T, T)
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
            )
            out = np.asarray(out, dtype=np.float64)
            for tile, values in zip(batch, out, strict=True):
                acc.add(lattice.tile_output_box(tile), values, window)
        result = acc.result()
        total += np.nan_to_num(result)
        if squares is not None:
            squares += np.nan_to_num(result) ** 2
    mean_model = total / spec.samples
    mean = norm.inverse(mean_model)
    std = None
    if squares is not None:
        var = np.maximum(squares / spec.samples - mean_model**2, 0.0)
        std = norm.scale_std(np.sqrt(var))
    # isotropic: the original slices are kept unchanged
    (z0, z1), (y0, y1), (x0, x1) = box
    for z_out, z_in in lattice.kept_slices(z0, z1):
        rz, ry, rx = (a for a, _ in read_box)
        mean[z_out - z0] = region[z_in - rz, y0 - ry : y1 - ry, x0 - rx : x1 - rx]
        if std is not None:
            std[z_out - z0] = 0.0
    return mean, std, len(tiles)


def run_chunk(spec: RunSpec, index: tuple[int, int, int]) -> dict:
    """One Dask task: read, enhance, blend and write output chunk ``index``, then mark it
    done. Idempotent (a retried task writes the same bytes)."""
    start = time.perf_counter()
    hook = spec.extra.get("chunk_hook")
    if hook is not None:
        hook(index)
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.chunks)
    read_box = lattice.read_box(box)
    region = read_input(spec, read_box)
    enhancer = (
        get_enhancer(spec.checkpoint, spec.device, spec.precision)
        if lattice.tiles_in(box)
        else None
    )
    mean, std, n_tiles = compute_chunk(spec, index, enhancer, region, read_box)
    _write(spec.output_path, box, to_dtype(mean, spec.dtype), spec.input_ndim)
    if std is not None:
        _write(spec.uncertainty_path, box, std.astype(np.float32), spec.input_ndim)
    mark_done(spec.output_path, index)
    return {"index": tuple(index), "tiles": n_tiles, "seconds": time.perf_counter() - start}


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
    """Run the chunks' tiles in a plain loop in this process — no Dask, no Zarr writes.

    The same reads, tiles, batches and blending as the pipeline; ``on_chunk(index, mean)``
    receives each blended chunk. Returns ``{"seconds", "tiles", "chunks"}``: the
    in-process baseline the pipeline's efficiency is measured against.
    """
    from emdiffuse.pipeline.lattice import iter_chunks

    lattice = spec.lattice
    if indices is None:
        indices = list(iter_chunks(lattice.output_shape, spec.chunks))
    if enhancer is None:
        enhancer = get_enhancer(spec.checkpoint, spec.device, spec.precision)
    start = time.perf_counter()
    tiles = 0
    for index in indices:
        box = chunk_box(index, lattice.output_shape, spec.chunks)
        read_box = lattice.read_box(box)
        region = read_input(spec, read_box)
        mean, _, n = compute_chunk(spec, index, enhancer, region, read_box)
        tiles += n
        if on_chunk is not None:
            on_chunk(tuple(index), mean)
    return {"seconds": time.perf_counter() - start, "tiles": tiles, "chunks": len(indices)}
