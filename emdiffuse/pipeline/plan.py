"""The plan of a run, reported before it starts: tiles, network evaluations, redundancy,
output chunks and an estimated time (one sampler step timed on this process's model).

All counts are separable over the chunk grid, so they are computed per axis and multiplied:
the plan of a 10⁴-chunk volume costs microseconds, not a walk over every tile.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from emdiffuse.models.calibration import fitted_sampling
from emdiffuse.models.sampler_names import network_evaluations  # NFE: the samplers' own count
from emdiffuse.pipeline.correlation import PILOT_SAMPLES, PILOT_TILES, pilot_evaluations
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
    samples: int  # 0: the posterior mean only
    steps: int
    sampler: str
    evaluations: int  # network evaluations of the whole run (evaluations_per_tile each tile)
    redundancy: float  # computed output voxels / output voxels
    seconds_per_tile: float | None  # one tile, all its evaluations in this run
    workers: int
    estimated_seconds: float | None
    tiles_per_chunk_sum: int = 0  # tiles met, summed over chunks (what a per-chunk graph runs)
    spacing: str = ""  # how the sampler's steps are placed ("" when not given)
    evaluations_per_tile: int = 0  # NFE * samples (+1 for a model's own mean); 1 mean-only
    seconds_per_evaluation: float | None = None
    schedule: str = ""  # the noise schedule the sampler walks, in words ("" when not given)
    start_noise: float | None = None  # σ each sample starts at (None: pure noise)
    blend: str = ""  # where the residual texture's correlation comes from ("" without texture)
    intervals: str = ""  # what the uncertainty image holds and how its scale is set

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
            f"network evaluations: {self.evaluations} ({self._evaluations_text()})",
            f"redundancy: {self.redundancy:.2f} computed voxels per output voxel",
        ]
        if self.blend:
            lines.append(f"texture blend: {self.blend}")
        if self.intervals:
            lines.append(f"uncertainty: {self.intervals}")
        if self.estimated_seconds is not None:
            lines.append(
                f"estimated time: {_format_seconds(self.estimated_seconds)} on {self.workers} "
                f"worker(s) at {self.seconds_per_tile:.3g} s per tile"
            )
        return "\n".join(lines)

    def _evaluations_text(self) -> str:
        """How the evaluations come about: the mean only, or the sampler's."""
        if self.samples == 0:
            return "posterior mean only: 1 per tile"
        text = (
            f"{self.sampler}, {self.steps} steps"
            + (f" on {self.spacing} spacing" if self.spacing else "")
            + (f" of {self.schedule}" if self.schedule else "")
            + (f", starting at noise σ {self.start_noise:g}" if self.start_noise else "")
            + f", {self.samples} sample(s)"
        )
        sampled = network_evaluations(self.sampler, self.steps) * self.samples
        if self.evaluations_per_tile > sampled:
            text += " + the model's mean, once per tile"
        return text


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


def evaluations_per_tile(sampler: str, steps: int, samples: int, shared_mean: bool) -> int:
    """Network evaluations one tile costs: 1 for the posterior mean only (``samples=0``);
    else the sampler's per sample, plus 1 for a model whose mean comes from a network of its
    own (``shared_mean``: evaluated once per tile, whatever the samples)."""
    if samples == 0:
        return 1
    return network_evaluations(sampler, steps) * samples + (1 if shared_mean else 0)


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
    shared_mean: bool = False,
    seconds_per_evaluation: float | None = None,
    schedule: str = "",
    start_noise: float | None = None,
) -> Plan:
    """Plan of a run. ``done``: chunks already finished (resume).

    Every lattice tile runs once (its output is shared by the chunks it overlaps); the time
    estimate for a resumed run scales the tiles by the share of chunks left to run. The
    time of a network evaluation is ``seconds_per_evaluation``, or ``seconds_per_tile`` (one
    sample of one tile: all the sampler's steps) over the sampler's evaluations.
    ``samples=0`` is the posterior mean only: one evaluation per tile. ``schedule``: the
    noise schedule the sampler walks, in words (for the report).
    """
    counts = tiles_per_chunk_axis(lattice, chunks)
    per_chunk_sum = int(np.prod([c.sum() for c in counts]))
    tiles_computed = lattice.n_tiles
    n_chunks = int(np.prod([len(c) for c in counts]))
    per_tile = evaluations_per_tile(sampler, steps, samples, shared_mean)
    evaluations = tiles_computed * per_tile
    remaining = tiles_computed * (n_chunks - done) / max(n_chunks, 1)
    if seconds_per_evaluation is None and seconds_per_tile is not None:
        seconds_per_evaluation = seconds_per_tile / network_evaluations(sampler, steps)
    tile_seconds = estimate = None
    if seconds_per_evaluation is not None:
        tile_seconds = seconds_per_evaluation * per_tile
        estimate = tile_seconds * remaining / max(workers, 1)
    return Plan(
        input_shape=tuple(lattice.input_shape),
        output_shape=tuple(lattice.output_shape),
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
        redundancy=lattice.redundancy,
        seconds_per_tile=tile_seconds,
        workers=workers,
        estimated_seconds=estimate,
        tiles_per_chunk_sum=per_chunk_sum,
        evaluations_per_tile=per_tile,
        seconds_per_evaluation=seconds_per_evaluation,
        schedule=schedule,
        start_noise=start_noise,
    )


def estimate_plan(
    spec: RunSpec,
    *,
    done: int = 0,
    seconds_per_tile: float | None = None,
    workers: int = 1,
    seconds_per_evaluation: float | None = None,
) -> Plan:
    """The :class:`Plan` of a prepared run."""
    s = spec.settings
    plan = make_plan(
        spec.lattice,
        spec.chunks,
        steps=s.steps,
        samples=s.samples,
        sampler=s.sampler,
        spacing=s.spacing or "",
        seconds_per_tile=seconds_per_tile,
        workers=workers,
        done=done,
        shared_mean=spec.shares_mean,
        seconds_per_evaluation=seconds_per_evaluation,
        schedule=spec.sampling_schedule_text,
        start_noise=s.start_noise,
    )
    return replace(plan, blend=blend_text(spec), intervals=intervals_text(spec))


def blend_text(spec: RunSpec) -> str:
    """Where the residual correlation of the texture blend comes from, in words ("" for a
    run without residual texture): the model's calibration, or a measurement before the
    run (:mod:`~emdiffuse.pipeline.correlation`) and what it costs."""
    s = spec.settings
    if spec.model_kind != "residual" or s.samples == 0:
        return ""
    if spec.residual_correlation is not None:
        source = spec.correlation_source or "given"
        return f"residual correlation {spec.residual_correlation:.3f}, {source}"
    cost = pilot_evaluations(s.sampler, s.steps)
    return (
        f"residual correlation measured before the run on {PILOT_TILES} central tiles, "
        f"{PILOT_SAMPLES} samples each ({cost} evaluations; the model records none for "
        "this sampling)"
    )


def intervals_text(spec: RunSpec) -> str:
    """What the uncertainty image will hold, in words ("" without one): the standard
    deviation over samples, or calibrated interval half-widths — fitted on this run's
    sampling, or rescaled to it by a spread ratio measured before the run
    (:mod:`~emdiffuse.pipeline.correlation`)."""
    s, calibration = spec.settings, spec.calibration
    if spec.mean_uncertainty:
        record = calibration["mean_interval"]
        return (f"{100 * float(record['level']):g} % interval half-widths of the mean, from "
                "the model's error head (calibrated at the end of training)")  # fmt: skip
    if s.samples < 2:
        return ""
    if calibration is None:
        return f"standard deviation over the {s.samples} samples (the model has no calibration)"
    level = f"{100 * float(calibration['level']):g} % interval half-widths"
    sampler, steps, spacing = fitted_sampling(calibration)
    if spec.interval_ratio == 1.0:
        return f"{level}, calibrated on this sampling ({sampler}, {steps} {spacing} steps)"
    if spec.interval_ratio is not None:
        return (f"{level}, calibrated on {sampler} at {steps} {spacing} steps, spread × "
                f"{spec.interval_ratio:.3f} for this sampling (measured on the central tiles)")  # fmt: skip
    cost = pilot_evaluations(sampler, steps)
    return (
        f"{level}, calibrated on {sampler} at {steps} {spacing} steps; this sampling's spread is "
        f"rescaled to it by a ratio measured before the run on the same {PILOT_TILES} "
        f"central tiles ({cost} more evaluations)"
    )


def measure_seconds_per_evaluation(enhancer, lattice: Lattice, *, mean_only: bool = False) -> float:
    """Estimated seconds of one network evaluation of one tile on this process's enhancer
    (a sampler step; with ``mean_only`` the posterior mean), so a dry run stays cheap
    whatever the steps and samples. A first evaluation on the smallest tile takes the
    one-time costs (device context, thread pools) out of the timing. Index-embedding models
    evaluate once per in-between slice, and that is in the timing."""

    def one(side: int) -> float:
        t = side // lattice.xy_scale
        cond = np.zeros((1, enhancer.in_slices, t, t), np.float32)
        noise = np.zeros((1, enhancer.out_slices, side, side), np.float32)
        # a model with a mean network of its own: that mean is given, so one step is timed
        mean = enhancer.posterior_mean(cond) if _own_mean(enhancer) and not mean_only else None
        start = time.perf_counter()
        if mean_only:
            enhancer.posterior_mean(cond, noise)
        else:  # deterministic, one step: one evaluation
            enhancer.sample_parts(cond, noise, sampler="ddim", steps=1, mean=mean)
        return time.perf_counter() - start

    one(enhancer.multiple)
    return one(lattice.tile)


def _own_mean(enhancer) -> bool:
    """Whether the model's mean comes from a network of its own (the residual kind)."""
    return getattr(enhancer, "kind", "sr3") == "residual"


def measure_seconds_per_tile(
    enhancer, lattice: Lattice, *, steps: int, sampler: str, spacing: str | None = None
) -> float:
    """Estimated seconds of one tile (all steps, one sample) on this process's enhancer:
    one sampler step timed (:func:`measure_seconds_per_evaluation`) and multiplied by the
    sampler's evaluations. ``spacing`` does not change the cost."""
    return measure_seconds_per_evaluation(enhancer, lattice) * network_evaluations(sampler, steps)
