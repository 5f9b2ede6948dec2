"""The pipeline's tasks in a plain loop in this process: no Dask, no Zarr writes.

:func:`run_in_process` is the reference for benchmarks and tests (the same reads, tiles,
batches and blending as a Dask run, in chunk order); :func:`compute_chunk` is the
self-contained form for one chunk (all its tiles run here, nothing shared). Both measure the
residual correlation first when the run's spec leaves it to be measured, as ``enhance`` does
(:mod:`~emdiffuse.pipeline.correlation`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.blend import add_weighted, finish_chunk, window_2d
from emdiffuse.pipeline.correlation import with_correlation
from emdiffuse.pipeline.lattice import chunk_box, iter_chunks
from emdiffuse.pipeline.settings import RunSpec
from emdiffuse.pipeline.tasks import (
    blend_chunk,
    block_plan,
    condition_region,
    produce_block,
    run_tiles,
    uncertainty_of,
)


def compute_chunk(
    spec: RunSpec, index: tuple[int, int, int], enhancer, region: np.ndarray | None, read_box
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Blend one output chunk from its input ``region`` (raw units, covering ``read_box``),
    running every tile that touches it here (no sharing with other chunks).

    Returns ``(mean in raw units as float64, uncertainty in raw units or None, tiles run)``. The
    pipeline computes the same values with each tile run once
    (:func:`~emdiffuse.pipeline.tasks.produce_block`,
    :func:`~emdiffuse.pipeline.tasks.blend_chunk`); this is the self-contained form.
    """
    spec = with_correlation(spec, enhancer=enhancer)
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.chunks)
    tiles = lattice.tiles_in(box)
    window = window_2d(lattice.tile, lattice.overlap)
    shape = tuple(b - a for a, b in box)
    totals = np.zeros((max(1, spec.settings.samples), *shape))
    residuals = None
    cond_region = condition_region(spec, region) if tiles else None
    for parts in run_tiles(spec, enhancer, tiles, cond_region, read_box):
        for j, tile in enumerate(parts.batch):
            tile_box = lattice.tile_output_box(tile)
            add_weighted(totals[parts.sample], box, tile_box, parts.mean[j], window)
            if parts.residual is not None:
                if residuals is None:
                    residuals = np.zeros_like(totals)
                add_weighted(residuals[parts.sample], box, tile_box, parts.residual[j], window)
    mean, std = finish_chunk(
        lattice, box, totals, spec.normalization, region, read_box,
        residuals=residuals, correlation=spec.residual_correlation,
        spread=uncertainty_of(spec),
    )  # fmt: skip
    return mean, std, len(tiles)


def run_in_process(
    spec: RunSpec,
    indices: Sequence[tuple[int, int, int]] | None = None,
    *,
    enhancer=None,
    on_chunk: Callable[[tuple, np.ndarray], None] | None = None,
) -> dict:
    """Run the chunks (cells of the task grid, :attr:`RunSpec.task_chunks`) in a plain loop
    in this process — no Dask, no Zarr writes.

    The same reads, tiles (each run once), batches and blending as the pipeline, in chunk
    order; a block's tiles are dropped once every chunk that needs them is blended.
    ``on_chunk(index, mean)`` receives each blended chunk. Returns ``{"seconds", "tiles",
    "chunks"}``: the in-process baseline the pipeline's efficiency is measured against.
    """
    lattice = spec.lattice
    if indices is None:
        indices = list(iter_chunks(lattice.output_shape, spec.task_chunks))
    indices = [tuple(int(i) for i in index) for index in indices]
    if enhancer is None:
        enhancer = runtime.spec_enhancer(spec)
    start = time.perf_counter()
    spec = with_correlation(spec, enhancer=enhancer)
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
