"""The bodies of the Dask tasks: run each tile once, blend chunks from the tiles, write.

Two task kinds (see :mod:`emdiffuse.pipeline.graph`). :func:`produce_block` runs the tiles
one block of the chunk grid *owns* (:class:`~emdiffuse.pipeline.lattice.Ownership`: each
lattice tile has exactly one owner, so no tile runs twice however many chunks it overlaps)
and returns their window-weighted sums cut to the chunks they reach — of each tile's mean
part and of its residual part, apart (:class:`TileParts`). :func:`run_chunk` adds the sums
of its source blocks, blends them (:func:`~emdiffuse.pipeline.blend.blend_parts`: the means
linearly, the residual texture variance-aware), writes its region of the output (and of the
uncertainty image) and marks the chunk done. :func:`block_plan` says which blocks feed
which chunks.

"Chunk" in these tasks is a cell of the task grid (:attr:`RunSpec.task_chunks`): with the
run's ``chunks_per_task`` at 1 (the default) an output chunk of the store, else a block of
several whole output chunks, blended and written by one task (fewer, larger tasks: the
scheduler's cost per task is paid less often).

Everything a task needs travels in a small :class:`~emdiffuse.pipeline.settings.RunSpec`
(paths and numbers, no arrays); the tasks open the input and output stores themselves and
use the process's Enhancer (:mod:`~emdiffuse.pipeline.runtime`), so a worker loads a model
once whatever the number of tasks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

from emdiffuse.models.calibration import half_widths, mean_half_widths
from emdiffuse.models.normalization import to_dtype
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.blend import add_weighted, finish_chunk, intersect, window_2d
from emdiffuse.pipeline.lattice import Box, Lattice, Ownership, Tile, chunk_box
from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise
from emdiffuse.pipeline.run_record import mark_done
from emdiffuse.pipeline.settings import RunSpec, tile_batch
from emdiffuse.pipeline.stages import add_seconds, timed


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
    """The blocks that tasks ``indices`` need, and the tasks each block feeds. Blocks and
    tasks are both cells of the task grid (:attr:`RunSpec.task_chunks`: with one output
    chunk per task, the output chunks themselves)."""
    own = ownership(spec.lattice, spec.task_chunks)
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
    reflection where the volume is smaller than a tile, and its z context beyond the
    volume's ends mirrored (:meth:`Lattice.unit_input_pad`)."""
    box = lattice.tile_input_box(tile)
    sl = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(box, read_box, strict=True))
    cond = region[sl]
    before, after = lattice.unit_input_pad(tile.unit)
    if before or after:
        cond = _mirror_z(cond, before, after)
    t = lattice.tile // lattice.xy_scale
    pad_y, pad_x = t - cond.shape[1], t - cond.shape[2]
    if pad_y or pad_x:
        cond = np.pad(cond, ((0, 0), (0, pad_y), (0, pad_x)), mode="symmetric")
    return cond


def _mirror_z(cond: np.ndarray, before: int, after: int) -> np.ndarray:
    """``cond`` (z, y, x) with ``before``/``after`` slices mirrored about its end slices
    (``numpy.pad`` ``reflect``; a single slice is repeated)."""
    mode = "reflect" if cond.shape[0] > 1 else "edge"
    return np.pad(cond, ((before, after), (0, 0), (0, 0)), mode=mode)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class TileParts:
    """One sample of a batch of tiles, in model space on the output grid (len(batch),
    out_slices, T, T) float32: ``mean`` each tile's posterior-mean estimate, clamped to
    [-1, 1]; ``residual`` its clamped sample minus that mean (None where it is zero
    throughout: models without a mean of their own, and the mean-only mode). A tile's
    output is ``mean + residual``; the blend treats the two parts differently
    (:mod:`~emdiffuse.pipeline.blend`)."""

    batch: Sequence[Tile]
    sample: int
    mean: np.ndarray
    residual: np.ndarray | None
    sigma: np.ndarray | None = None  # the error head's σ of the mean (mean-only runs)


def split_sample(mean: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A tile's (mean, residual) from the Enhancer (unclamped, model space) -> the parts
    the blend takes: the clamped mean, and the clamped sample minus it (None when zero
    throughout, as for models whose residual is zero: their output is then exactly the
    clamped sample, as blended before parts existed)."""
    mean = np.asarray(mean, dtype=np.float32)
    clamped = np.clip(mean, -1.0, 1.0)
    rest = np.clip(mean + np.asarray(residual, dtype=np.float32), -1.0, 1.0) - clamped
    return clamped, (rest if rest.any() else None)


def run_tiles(
    spec: RunSpec,
    enhancer,
    tiles: Sequence[Tile],
    cond_region: np.ndarray,
    read_box: Box,
) -> Iterator[TileParts]:
    """Run ``tiles`` in batches of the run's batch size, every sample of a batch before the
    next batch: yields one :class:`TileParts` per batch and sample.

    ``samples=0`` (mean only): one network evaluation per tile
    (``Enhancer.posterior_mean``), no residual. Otherwise ``Enhancer.sample_parts`` per
    sample; a model's own mean (its mean network) is computed once per batch and reused
    for every sample. ``cond_region`` is the normalised input over ``read_box``. A tile's
    noise is keyed on its global origin and the sample, so its output does not depend on
    the batch it runs in (up to the float rounding of batched kernels)."""
    lattice, s = spec.lattice, spec.settings
    T = lattice.tile
    noise_shape = (lattice.tile_output_slices, T, T)
    device = getattr(getattr(enhancer, "device", None), "type", "cpu")
    for batch in _batches(tiles, tile_batch(s.batch_size, device)):
        with timed("gather"):
            cond = np.stack([tile_condition(lattice, t, cond_region, read_box) for t in batch])
            cond = cond.astype(np.float32)
        origins = [lattice.tile_origin(t) for t in batch]

        def noise_of(sample: int, step: int, origins=origins) -> np.ndarray:
            return np.stack([tile_noise(s.seed, sample, o, step, noise_shape) for o in origins])

        if spec.mean_only:
            with timed("noise"):
                x_T = noise_of(0, INITIAL_STEP)
            sigma = None
            with timed("network"):
                if spec.mean_uncertainty:
                    mean, sigma = enhancer.posterior_mean_and_sigma(cond)
                else:
                    mean = enhancer.posterior_mean(cond, x_T)
            runtime.count_tiles(len(batch))
            with timed("blend"):
                mean = np.clip(np.asarray(mean, np.float32), -1.0, 1.0)
            yield TileParts(batch, 0, mean, None, sigma)
            continue
        shared = None  # the model's own mean of this batch, once computed
        for sample in range(s.samples):
            with timed("noise"):
                x_T = noise_of(sample, INITIAL_STEP)
            with timed("network"):  # a stochastic sampler's step noise counts here
                mean, residual = enhancer.sample_parts(
                    cond,
                    x_T,
                    sampler=s.sampler,
                    steps=s.steps,
                    step_noise=partial(noise_of, sample),
                    spacing=s.spacing,
                    mean=shared,
                    # only when set: an injected enhancer (enhancer_factory) need not know it
                    **({} if s.start_noise is None else {"start_noise": s.start_noise}),
                )
            if spec.shares_mean:
                shared = mean
            runtime.count_tiles(len(batch))
            with timed("blend"):
                parts = TileParts(batch, sample, *split_sample(mean, residual))
            yield parts


def condition_region(spec: RunSpec, region: np.ndarray) -> np.ndarray:
    """The input region in model space (the condition's range), clipped to [-1, 1] as the
    network saw in training."""
    return np.clip(spec.input_normalization.forward(region), -1.0, 1.0)


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

    Returns ``{"block", "pieces": {chunk index: (box, mean totals, residual totals or
    None, σ totals or None)}, "tiles", "seconds"}``, totals float32 (samples, dz, dy, dx)
    (one sample in mean-only mode) of the tiles' mean and residual parts and of the error
    head's σ (:class:`TileParts`); a piece
    covers only the part of the chunk those tiles reach. All owned tiles run whatever the
    targets (a resumed run batches them as the first run did, so it writes the same bytes).
    """
    start = time.perf_counter()
    lattice = spec.lattice
    slots = max(1, spec.settings.samples)
    tiles = ownership(lattice, spec.task_chunks).owned_tiles(tuple(block))
    reach = lattice.output_box_of(tiles)
    boxes: dict = {}
    if tiles:
        for index in targets:
            inter = intersect(chunk_box(index, lattice.output_shape, spec.task_chunks), reach)
            if inter is not None:
                boxes[tuple(index)] = inter
    means = {i: np.zeros((slots, *(b - a for a, b in box)), np.float32) for i, box in boxes.items()}
    residuals: dict = {}  # made at the first residual that is not zero
    sigmas: dict = {}  # the error head's σ (mean-only runs that write intervals)
    if boxes:
        read_box = lattice.input_box_of(tiles)
        with timed("read"):
            region = runtime.read_input(spec, read_box)
        with timed("normalise"):
            cond_region = condition_region(spec, region)
        if enhancer is None:
            enhancer = runtime.spec_enhancer(spec)
        window = window_2d(lattice.tile, lattice.overlap)
        for parts in run_tiles(spec, enhancer, tiles, cond_region, read_box):
            blend_start = time.perf_counter()
            for j, tile in enumerate(parts.batch):
                tile_box = lattice.tile_output_box(tile)
                for index, box in boxes.items():
                    add_weighted(means[index][parts.sample], box, tile_box, parts.mean[j], window)
                    if parts.sigma is not None:
                        if index not in sigmas:
                            sigmas[index] = np.zeros_like(means[index])
                        add_weighted(sigmas[index][0], box, tile_box, parts.sigma[j], window)
                    if parts.residual is None:
                        continue
                    if index not in residuals:
                        residuals[index] = np.zeros_like(means[index])
                    add_weighted(
                        residuals[index][parts.sample], box, tile_box, parts.residual[j], window
                    )
            add_seconds("blend", time.perf_counter() - blend_start)
    pieces = {i: (box, means[i], residuals.get(i), sigmas.get(i)) for i, box in boxes.items()}
    seconds = time.perf_counter() - start
    add_seconds("tile_task", seconds)
    return {
        "block": tuple(block),
        "pieces": pieces,
        "tiles": len(tiles) if pieces else 0,
        "seconds": seconds,
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
    ``(mean in raw units as float64, uncertainty in raw units or None)``. Parts are summed
    in the order given (the graph gives them in block order, so a rerun adds in the same
    order)."""
    if spec.residual_correlation is None:
        raise RuntimeError("the run's residual correlation is not measured yet "
                           "(pipeline.correlation.with_correlation comes before the tasks)")  # fmt: skip
    lattice = spec.lattice
    box = chunk_box(index, lattice.output_shape, spec.task_chunks)
    shape = tuple(b - a for a, b in box)
    slots = max(1, spec.settings.samples)
    totals = np.zeros((slots, *shape))
    residuals = sigmas = None
    for part in parts:
        piece = part["pieces"].get(tuple(index))
        if piece is None:
            continue
        pbox, means, rest, sigma = piece
        sl = (
            slice(None),
            *(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(pbox, box, strict=True)),
        )
        totals[sl] += means
        if rest is not None:
            if residuals is None:
                residuals = np.zeros_like(totals)
            residuals[sl] += rest
        if sigma is not None:
            if sigmas is None:
                sigmas = np.zeros_like(totals)
            sigmas[sl] += sigma
    kept_region, kept_box = kept_input(spec, box)
    return finish_chunk(
        lattice, box, totals, spec.normalization, kept_region, kept_box,
        residuals=residuals, correlation=spec.residual_correlation,
        spread=uncertainty_of(spec), sigmas=sigmas,
    )  # fmt: skip


def uncertainty_of(spec: RunSpec):
    """What the uncertainty image holds, as a map of the standard deviation over samples
    (model space): the calibrated interval half-widths of a model that stores a calibration,
    else None (the standard deviation itself); for the mean alone, the error head's σ
    scaled to half-widths by its ``mean_interval`` record."""
    if spec.mean_uncertainty:
        return partial(mean_half_widths, record=spec.calibration["mean_interval"])
    if spec.calibration is None or spec.settings.samples < 2:
        return None
    if spec.interval_ratio is None:
        raise RuntimeError("the run's interval ratio is not measured yet "
                           "(pipeline.correlation.with_correlation comes before the tasks)")  # fmt: skip
    return partial(half_widths, calibration=spec.calibration, samples=spec.settings.samples,
                   ratio=spec.interval_ratio)  # fmt: skip


def run_chunk(spec: RunSpec, index: tuple[int, int, int], *parts: dict) -> dict:
    """One Dask task: blend task region ``index`` (of the :attr:`RunSpec.task_chunks` grid:
    ``chunks_per_task`` output chunks, one by default) from its source blocks' ``parts``
    (see :func:`produce_block`), write it and mark each of its output chunks done.
    Idempotent (a retried task writes the same bytes)."""
    start = time.perf_counter()
    if spec.chunk_hook is not None:
        spec.chunk_hook(index)
    box = chunk_box(index, spec.lattice.output_shape, spec.task_chunks)
    blend_start = time.perf_counter()
    mean, spread = blend_chunk(spec, index, parts)  # (isotropic: with the kept slices' read)
    values = to_dtype(mean, spec.settings.dtype)
    spread = None if spread is None else spread.astype(np.float32)
    add_seconds("blend", time.perf_counter() - blend_start)
    with timed("write"):
        _write(spec.output_path, box, values, spec.input_ndim)
        if spread is not None and spec.writes_uncertainty:
            _write(spec.uncertainty_path, box, spread, spec.input_ndim)
        for chunk in spec.chunks_in_task(index):
            mark_done(spec.output_path, chunk)
    seconds = time.perf_counter() - start
    add_seconds("chunk_task", seconds)
    return {
        "index": tuple(index),
        "tiles": len(spec.lattice.tiles_in(box)),
        "seconds": seconds,
    }


def _write(path: str, box: Box, block: np.ndarray, ndim: int) -> None:
    array = runtime.open_output(path)
    slices = tuple(slice(a, b) for a, b in box)
    if ndim == 2:
        array[slices[1:]] = block[0]
    else:
        array[slices] = block
