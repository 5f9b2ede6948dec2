"""The bodies of the Dask tasks: run each tile once, blend chunks from the tiles, write.

Two task kinds (see :mod:`emdiffuse.pipeline.graph`). :func:`produce_block` runs the tiles
one block of the chunk grid *owns* (:class:`~emdiffuse.pipeline.lattice.Ownership`: each
lattice tile has exactly one owner, so no tile runs twice however many chunks it overlaps)
and returns their window-weighted sums cut to the chunks they reach. :func:`run_chunk` adds
the sums of its source blocks, divides by the summed windows, writes its region of the
output and marks the chunk done. :func:`block_plan` says which blocks feed which chunks.

Everything a task needs travels in a small :class:`~emdiffuse.pipeline.settings.RunSpec`
(paths and numbers, no arrays); the tasks open the input and output stores themselves and
use the process's Enhancer (:mod:`~emdiffuse.pipeline.runtime`), so a worker loads a model
once whatever the number of tasks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from emdiffuse.models.normalization import to_dtype
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.blend import add_weighted, finish_chunk, intersect, window_2d
from emdiffuse.pipeline.lattice import Box, Lattice, Ownership, Tile, chunk_box
from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise
from emdiffuse.pipeline.run_record import mark_done
from emdiffuse.pipeline.settings import RunSpec


# ---- which blocks feed which chunks ----------------------------------------------------------
@lru_cache(maxsize=32)
def ownership(lattice: Lattice, chunks: tuple[int, int, int]) -> Ownership:
    """The (cached) :class:`Ownership` of a run's tiles by its chunk grid."""
    return Ownership(lattice, tuple(chunks))


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


# ---- running tiles ---------------------------------------------------------------------------
def tile_condition(lattice: Lattice, tile: Tile, region: np.ndarray, read_box: Box) -> np.ndarray:
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
    """Run ``tiles`` (one sample) in batches of the run's batch size: yields ``(batch,
    out)`` with ``out`` (len(batch), out_slices, T, T) float32 in model space.

    ``cond_region`` is the normalised input over ``read_box``. A tile's noise is keyed on
    its global origin, so its output does not depend on the batch it runs in (up to the
    float rounding of batched kernels)."""
    lattice, s = spec.lattice, spec.settings
    T = lattice.tile
    noise_shape = (lattice.tile_output_slices, T, T)
    for batch in _batches(tiles, max(1, s.batch_size)):
        cond = np.stack([tile_condition(lattice, t, cond_region, read_box) for t in batch])
        origins = [lattice.tile_origin(t) for t in batch]
        noise = np.stack(
            [tile_noise(s.seed, sample, o, INITIAL_STEP, noise_shape) for o in origins]
        )

        def step_noise(step: int, origins=origins, sample=sample, shape=noise_shape):
            return np.stack([tile_noise(s.seed, sample, o, step, shape) for o in origins])

        out = enhancer.enhance(
            cond.astype(np.float32),
            noise,
            sampler=s.sampler,
            steps=s.steps,
            step_noise=step_noise,
            spacing=s.spacing,
        )
        runtime.count_tiles(len(batch))
        yield batch, np.asarray(out, dtype=np.float32)


def condition_region(spec: RunSpec, region: np.ndarray) -> np.ndarray:
    """The input region in model space, clipped to [-1, 1] as the network saw in training."""
    return np.clip(spec.normalization.forward(region), -1.0, 1.0)


# ---- the two tasks ---------------------------------------------------------------------------
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
    lattice, samples = spec.lattice, spec.settings.samples
    tiles = ownership(lattice, spec.chunks).owned_tiles(tuple(block))
    reach = lattice.output_box_of(tiles)
    pieces: dict = {}
    if tiles:
        for index in targets:
            inter = intersect(chunk_box(index, lattice.output_shape, spec.chunks), reach)
            if inter is not None:
                shape = (samples, *(b - a for a, b in inter))
                pieces[tuple(index)] = (inter, np.zeros(shape, dtype=np.float32))
    if pieces:
        read_box = lattice.input_box_of(tiles)
        cond_region = condition_region(spec, runtime.read_input(spec, read_box))
        if enhancer is None:
            enhancer = runtime.spec_enhancer(spec)
        window = window_2d(lattice.tile, lattice.overlap)
        for sample in range(samples):
            for batch, out in run_tiles(spec, enhancer, tiles, cond_region, read_box, sample):
                for tile, values in zip(batch, out, strict=True):
                    tile_box = lattice.tile_output_box(tile)
                    for box, total in pieces.values():
                        add_weighted(total[sample], box, tile_box, values, window)
    return {
        "block": tuple(block),
        "pieces": pieces,
        "tiles": len(tiles) if pieces else 0,
        "seconds": time.perf_counter() - start,
    }


def kept_input(spec: RunSpec, box: Box) -> tuple[np.ndarray | None, Box | None]:
    """The input slices kept unchanged in output ``box`` (isotropic runs) and their box."""
    kept = spec.lattice.kept_slices(*box[0])
    if not kept:
        return None, None
    (y0, y1), (x0, x1) = box[1], box[2]
    kept_box = ((kept[0][1], kept[-1][1] + 1), (y0, y1), (x0, x1))
    return runtime.read_input(spec, kept_box), kept_box


def blend_chunk(
    spec: RunSpec, index: tuple[int, int, int], parts: Sequence[dict]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Chunk ``index`` from the :func:`produce_block` results of its source blocks:
    ``(mean in raw units as float64, std in raw units or None)``. Parts are summed in the
    order given (the graph gives them in block order, so a rerun adds in the same order)."""
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.chunks)
    shape = tuple(b - a for a, b in box)
    totals = np.zeros((spec.settings.samples, *shape))
    for part in parts:
        piece = part["pieces"].get(tuple(index))
        if piece is None:
            continue
        pbox, values = piece
        sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(pbox, box, strict=True))
        totals[(slice(None), *sl)] += values
    kept_region, kept_box = kept_input(spec, box)
    return finish_chunk(lattice, box, totals, spec.normalization, kept_region, kept_box)


def run_chunk(spec: RunSpec, index: tuple[int, int, int], *parts: dict) -> dict:
    """One Dask task: blend output chunk ``index`` from its source blocks' ``parts`` (see
    :func:`produce_block`), write it and mark it done. Idempotent (a retried task writes
    the same bytes)."""
    start = time.perf_counter()
    if spec.chunk_hook is not None:
        spec.chunk_hook(index)
    box = chunk_box(index, spec.lattice.output_shape, spec.chunks)
    mean, std = blend_chunk(spec, index, parts)
    _write(spec.output_path, box, to_dtype(mean, spec.settings.dtype), spec.input_ndim)
    if std is not None:
        _write(spec.uncertainty_path, box, std.astype(np.float32), spec.input_ndim)
    mark_done(spec.output_path, index)
    return {
        "index": tuple(index),
        "tiles": len(spec.lattice.tiles_in(box)),
        "seconds": time.perf_counter() - start,
    }


def _write(path: str, box: Box, block: np.ndarray, ndim: int) -> None:
    array = runtime.open_output(path)
    slices = tuple(slice(a, b) for a, b in box)
    if ndim == 2:
        array[slices[1:]] = block[0]
    else:
        array[slices] = block
