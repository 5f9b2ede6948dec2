"""The plan of a run, reported before it starts: tiles, network evaluations, redundancy,
output chunks and an estimated time (one sampler step timed on this process's model).

All counts are separable over the chunk grid, so they are computed per axis and multiplied:
the plan of a 10⁴-chunk volume costs microseconds, not a walk over every tile.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from emdiffuse.models.sampler_names import network_evaluations  # NFE: the samplers' own count
from emdiffuse.pipeline.lattice import Lattice, chunk_grid
from emdiffuse.pipeline.settings import RunSpec


@dataclass(frozen=True)
class Plan:
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    n_chunks: int
    chunks_to_run: int
    tile: int
    overlap: int
    n_tiles: int  # distinct lattice tiles
    tiles_computed: int  # tiles run: each lattice tile once, whatever the chunks it overlaps
    samples: int
    steps: int
    sampler: str
    evaluations: int  # tiles_computed * NFE(steps) * samples
    redundancy: float  # computed output voxels / output voxels
    seconds_per_tile: float | None  # one tile, all steps, one sample
    workers: int
    estimated_seconds: float | None
    tiles_per_chunk_sum: int = 0  # tiles met, summed over chunks (what a per-chunk graph runs)
    spacing: str = ""  # how the sampler's steps are placed ("" when not given)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        """Human-readable summary, one item per line."""
        lines = [
            f"input {'x'.join(map(str, self.input_shape))} -> output "
            f"{'x'.join(map(str, self.output_shape))} (zyx voxels)",
            f"output chunks: {self.n_chunks} of {'x'.join(map(str, self.chunks))}"
            + (
                f" ({self.n_chunks - self.chunks_to_run} already done)"
                if self.chunks_to_run != self.n_chunks
                else ""
            ),
            f"tiles: {self.n_tiles} of {self.tile}x{self.tile}, overlap {self.overlap}; "
            f"each runs once ({self.tiles_computed} runs) and is shared by the chunks it "
            f"overlaps",
            f"network evaluations: {self.evaluations} "
            f"({self.sampler}, {self.steps} steps"
            + (f" on {self.spacing} spacing" if self.spacing else "")
            + f", {self.samples} sample(s))",
            f"redundancy: {self.redundancy:.2f} computed voxels per output voxel",
        ]
        if self.estimated_seconds is not None:
            lines.append(
                f"estimated time: {_format_seconds(self.estimated_seconds)} on {self.workers} "
                f"worker(s) at {self.seconds_per_tile:.3g} s per tile"
            )
        return "\n".join(lines)


def _format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def tiles_per_chunk_axis(lattice: Lattice, chunks: tuple[int, int, int]) -> list[np.ndarray]:
    """Per axis (z units, y tiles, x tiles): how many lattice entries each chunk row meets."""
    shape = lattice.output_shape
    grid = chunk_grid(shape, chunks)
    counts = []
    for axis, between in enumerate(
        (lattice.units_between, lattice.y.tiles_between, lattice.x.tiles_between)
    ):
        c = chunks[axis]
        counts.append(
            np.array(
                [len(between(i * c, min((i + 1) * c, shape[axis]))) for i in range(grid[axis])],
                dtype=np.int64,
            )
        )
    return counts


def make_plan(
    lattice: Lattice,
    chunks: tuple[int, int, int],
    *,
    steps: int,
    samples: int,
    sampler: str,
    seconds_per_tile: float | None = None,
    workers: int = 1,
    done: int = 0,
    spacing: str = "",
) -> Plan:
    """Plan of a run. ``done``: chunks already finished (resume).

    Every lattice tile runs once (its output is shared by the chunks it overlaps); the time
    estimate for a resumed run scales the tiles by the share of chunks left to run.
    """
    counts = tiles_per_chunk_axis(lattice, chunks)
    per_chunk_sum = int(np.prod([c.sum() for c in counts]))
    tiles_computed = lattice.n_tiles
    n_chunks = int(np.prod([len(c) for c in counts]))
    out_shape = lattice.output_shape
    computed_voxels = tiles_computed * lattice.tile_output_slices * lattice.tile**2
    redundancy = computed_voxels / float(np.prod(out_shape))
    evaluations = tiles_computed * network_evaluations(sampler, steps) * samples
    remaining = tiles_computed * (n_chunks - done) / max(n_chunks, 1)
    estimate = (
        None
        if seconds_per_tile is None
        else seconds_per_tile * remaining * samples / max(workers, 1)
    )
    return Plan(
        input_shape=tuple(lattice.input_shape),
        output_shape=tuple(out_shape),
        chunks=tuple(chunks),
        n_chunks=n_chunks,
        chunks_to_run=n_chunks - done,
        tile=lattice.tile,
        overlap=lattice.overlap,
        n_tiles=lattice.n_tiles,
        tiles_computed=tiles_computed,
        samples=samples,
        steps=steps,
        sampler=sampler,
        spacing=spacing,
        evaluations=evaluations,
        redundancy=redundancy,
        seconds_per_tile=seconds_per_tile,
        workers=workers,
        estimated_seconds=estimate,
        tiles_per_chunk_sum=per_chunk_sum,
    )


def estimate_plan(
    spec: RunSpec, *, done: int = 0, seconds_per_tile: float | None = None, workers: int = 1
) -> Plan:
    """The :class:`Plan` of a prepared run."""
    s = spec.settings
    return make_plan(
        spec.lattice,
        spec.chunks,
        steps=s.steps,
        samples=s.samples,
        sampler=s.sampler,
        spacing=s.spacing or "",
        seconds_per_tile=seconds_per_tile,
        workers=workers,
        done=done,
    )


def measure_seconds_per_tile(
    enhancer, lattice: Lattice, *, steps: int, sampler: str, spacing: str | None = None
) -> float:
    """Estimated seconds of one tile (all steps, one sample) on this process's enhancer:
    one sampler step (one network evaluation; one per in-between slice for index-embedding
    models) is timed and multiplied by the sampler's evaluations, so a dry run stays cheap
    whatever ``steps`` is. A step on the smallest tile first takes the one-time costs (device
    context, thread pools) out of the timing. ``spacing`` does not change the cost."""

    def one_step(side: int) -> float:
        t = side // lattice.xy_scale
        cond = np.zeros((1, enhancer.in_slices, t, t), np.float32)
        noise = np.zeros((1, enhancer.out_slices, side, side), np.float32)
        start = time.perf_counter()
        enhancer.enhance(cond, noise, sampler="ddim", steps=1)  # deterministic: one evaluation
        return time.perf_counter() - start

    one_step(enhancer.multiple)
    return one_step(lattice.tile) * network_evaluations(sampler, steps)
