"""The settings of an enhancement run: declared once, validated once, recorded once.

- :class:`RunSettings`: what the run computes (sampler, steps, spacing, samples, seed, tile,
  overlap, chunks, normalize, dtype) and how (device, precision, batch size). Built once
  by :func:`emdiffuse.enhance` from its keywords, by the CLI and the workflow scripts from
  the CLI's options (``emdiffuse._cli.enhance.add_arguments``, the one declaration of
  them); every value is checked in ``__post_init__`` and nowhere else.
- :class:`Source`: what the run reads (input, level, voxel size; the model and the task and
  factor expected of it).
- :class:`Scheduling`: where the run computes (a client, a scheduler address, Dask's
  threads in this process, or a LocalCluster of ``workers``).
- :class:`RunSpec`: the settings resolved against the input and the model (defaults filled
  in, tile lattice, output chunks and grid, intensity normalisation, the checkpoint's hash):
  everything a chunk task needs, small and picklable. :meth:`RunSpec.record` is the run
  record ``run.json``; ``--resume`` continues only a run whose record is the same.

This module imports neither torch nor Dask: the CLI reads its defaults at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.precision_names import PRECISIONS
from emdiffuse.models.sampler_names import (
    DEFAULT_SAMPLER,
    check_sampler,
    check_start_noise,
    default_sampling,
    resolve_spacing,
)
from emdiffuse.pipeline.lattice import Lattice

if TYPE_CHECKING:  # a type only: the record stays importable without the models' numerics
    from emdiffuse.models.normalization import Normalization

SEED_MAX = 2**63 - 1  # the noise key packs the seed as a signed 64-bit integer (pipeline.noise)
CONNECT_TIMEOUT = 5.0  # seconds to reach a Dask scheduler (distributed's own default is 30)
NORMALIZE_MODES = ("model", "auto")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEFAULT_TILE_MAX = 256  # the default tile side (output grid), at most
DEFAULT_OVERLAP_FRACTION = 3 / 32  # default overlap / tile: 24 of 256, 1.27 computed voxels per
# output voxel on large slices (0.25 was 1.8; benchmarks/results/tiling.md)
DEFAULT_CHUNK_YX = 512  # the default output chunk side in y and x
SCHEDULER_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://")


# tiles per network call when --batch-size is not given, by the device that runs them: on an
# H200 the reference UNet ran 231 evaluations/s of 256² tiles at batch 4 and 464 at 16 (bf16,
# benchmarks/results/gpu.md); 4 keeps a CPU worker's memory small
DEFAULT_TILE_BATCH = {"cuda": 16, "cpu": 4}


def tile_batch(batch_size: int | None, device_type: str) -> int:
    """Tiles per network call: ``batch_size``, or (None) the default of the device type
    (``cuda``, ``cpu``) that runs them, :data:`DEFAULT_TILE_BATCH`."""
    if batch_size is not None:
        return int(batch_size)
    return DEFAULT_TILE_BATCH.get(device_type, DEFAULT_TILE_BATCH["cpu"])


def check_positive_int(name: str, value) -> int:
    """``value`` as an int when it is a positive integer (not a bool), else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_count(name: str, value) -> int:
    """``value`` as an int when it is a non-negative integer (not a bool), else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    """``seed`` as an int when the noise generator takes it (0 … 2**63 - 1)."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed <= SEED_MAX
    ):
        raise InputError(f"seed must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    return int(seed)


def _check_interval_level(level) -> float | None:
    """None (the model's calibrated level) or a level in (0, 1)."""
    if level is None:
        return None
    ok = isinstance(level, (int, float, np.floating)) and not isinstance(level, bool)
    if not ok or not 0 < float(level) < 1:
        raise InputError(f"interval level must be in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def _check_overlap(overlap) -> int | None:
    if overlap is None:
        return None
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise InputError(f"overlap must be an integer, got {overlap!r}")
    return int(overlap)


def _check_chunks(chunks) -> int | tuple[int, ...] | None:
    """None (the default chunks), one size for every axis, or one size per axis."""
    if chunks is None:
        return None
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        return check_positive_int("each chunk size", chunks)
    return tuple(check_positive_int("each chunk size", c) for c in chunks)


def _check_chunks_per_task(value) -> int | tuple[int, ...]:
    """One factor for every axis, or one per axis (each a positive integer)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return check_positive_int("chunks per task", value)
    try:
        return tuple(check_positive_int("each chunks-per-task factor", c) for c in value)
    except TypeError:
        raise InputError(
            f"chunks per task must be an integer or one per axis, got {value!r}"
        ) from None


def _check_dtype(dtype) -> str | None:
    """The output dtype's name (None: the input's), an integer or float type."""
    if dtype is None:
        return None
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise InputError(f"unknown dtype {dtype!r}; use e.g. uint8, uint16 or float32") from None
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(f"output dtype {dtype} is not an integer or float type")
    return str(dtype)


@dataclass(frozen=True)
class RunSettings:
    """What a run computes and how; the defaults here are the API's and the CLI's.

    ``steps`` and ``spacing`` None are the model's defaults, filled in when the run is
    prepared (:func:`~emdiffuse.models.sampler_names.default_sampling`): 4 steps on the
    schedule a mean-plus-residual model fitted for the sampler at the end of training where
    it has one, else 8 steps on the sampler's default spacing (``time`` for ddpm,
    ``logsnr`` for the others). ``start_noise`` (residual-kind models) starts
    each sample at noise level σ instead of pure noise (a truncated start: the mean's
    structure, the model's texture; see :meth:`~emdiffuse.models.enhancer.Enhancer.enhance`).
    ``tile``, ``overlap``, ``chunks`` (one size, or one per axis) and ``dtype`` None are
    chosen for the input and the model when the run is prepared. ``samples``: 0 is the posterior mean only (one network evaluation per
    tile, no uncertainty), 1 one sample, N >= 2 the mean of N samples and the uncertainty
    image. ``normalize``: ``model`` (the model's training ranges) or ``auto`` (percentiles
    of a sample of the input). ``device``: auto, cpu, cuda or cuda:N. ``batch_size``: tiles
    per network call, None for the device's default (:func:`tile_batch`). ``chunks_per_task``:
    how many output chunks one Dask task computes and writes, per axis (one factor for
    every axis, or one per axis of the input): larger tasks amortise the scheduler's cost
    per task; a task's memory grows with its region, never with the volume. Resolved to
    zyx factors when the run is prepared; like ``batch_size`` it changes the output only by
    the float rounding of batched kernels, and a run resumes with any value. ``compile``:
    evaluate the network through ``torch.compile``, one graph per tile shape in each worker
    (:mod:`emdiffuse.models.compiled`): its first batch compiles for tens of seconds, then the
    network runs faster (2.9× in bf16 on an H200); for large volumes on a GPU. It too changes
    the output only by float rounding, and a run resumes with either value.
    ``interval_level``: the level of the calibrated intervals in the uncertainty image (one
    the model's calibration holds, :data:`emdiffuse.models.calibration.INTERVAL_LEVELS`;
    None: the level it was calibrated at, 90 % by default).
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    spacing: str | None = None
    start_noise: float | None = None
    samples: int = 1
    seed: int = 0
    tile: int | None = None
    overlap: int | None = None
    chunks: int | tuple[int, ...] | None = None
    normalize: str = "model"
    dtype: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    chunks_per_task: int | tuple[int, ...] = 1
    compile: bool = False
    interval_level: float | None = None

    def __post_init__(self) -> None:
        check_sampler(self.sampler)
        checked = {
            "steps": None if self.steps is None else check_positive_int("steps", self.steps),
            "samples": check_count("samples", self.samples),
            "batch_size": (None if self.batch_size is None
                           else check_positive_int("batch_size", self.batch_size)),  # fmt: skip
            "seed": check_seed(self.seed),
            # None stays the model's default until the run is prepared
            "spacing": None if self.spacing is None else resolve_spacing(self.sampler, self.spacing),
        }
        checked["start_noise"] = check_start_noise(
            self.start_noise, checked["spacing"] or resolve_spacing(self.sampler)
        )
        if checked["start_noise"] is not None and checked["samples"] == 0:
            raise InputError("start_noise is for sampling; with samples 0 (the mean) leave it out")
        if self.normalize not in NORMALIZE_MODES:
            raise InputError(f"normalize must be 'model' or 'auto', got {self.normalize!r}")
        device = str(self.device)
        if not (device in ("auto", "cpu") or device.startswith("cuda")):
            raise InputError(f"unknown device {self.device!r}; use {DEVICE_CHOICES}")
        if self.precision not in PRECISIONS:
            raise InputError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        checked["device"] = device
        if not isinstance(self.compile, (bool, np.bool_)):
            raise InputError(f"compile must be true or false, got {self.compile!r}")
        checked["compile"] = bool(self.compile)
        checked["tile"] = None if self.tile is None else check_positive_int("tile", self.tile)
        checked["overlap"] = _check_overlap(self.overlap)
        checked["chunks"] = _check_chunks(self.chunks)
        checked["chunks_per_task"] = _check_chunks_per_task(self.chunks_per_task)
        checked["dtype"] = _check_dtype(self.dtype)
        checked["interval_level"] = _check_interval_level(self.interval_level)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def with_sampling(self, step_schedules: Mapping[str, Any] | None = None) -> RunSettings:
        """These settings with the model's default steps and spacing filled in where None
        (:func:`~emdiffuse.models.sampler_names.default_sampling`; ``step_schedules``: the
        fitted schedules of a mean-plus-residual model, None for any other)."""
        steps, spacing = default_sampling(
            self.sampler, self.steps, self.spacing, step_schedules, self.start_noise
        )
        return replace(self, steps=steps, spacing=spacing)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default (what the CLI's options declare as theirs)."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Source:
    """What a run reads: the input volume (``level`` of its pyramid; ``voxel_size`` in nm
    when its metadata lacks it) and the model checkpoint, refused when it was made for
    another ``task`` or ``scale_factor`` (None: any)."""

    input: str
    model: str
    level: int = 0
    voxel_size: str | float | Sequence[float] | None = None
    task: str | None = None
    scale_factor: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", str(self.input))
        object.__setattr__(self, "model", str(self.model))


@dataclass(frozen=True)
class Scheduling:
    """Where a run computes: ``client`` (a ``distributed.Client``) if given; else
    ``scheduler="threads"`` (Dask's threaded scheduler in this process, ``workers``
    threads), a scheduler address (``tcp://...``, reached within ``connect_timeout``
    seconds), or None: a LocalCluster started for the run (one worker per GPU, else
    ``workers`` CPU worker processes) and closed at its end."""

    client: Any = None
    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    connect_timeout: float = CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        for name, value in (
            ("workers (--workers)", self.workers),
            ("threads per worker (--threads-per-worker)", self.threads_per_worker),
        ):
            if value is not None:
                check_positive_int(name, value)
        if (
            self.client is None
            and self.remote
            and not str(self.scheduler).startswith(SCHEDULER_SCHEMES)
        ):
            raise InputError(
                f"scheduler must be 'threads' or an address like tcp://host:8786, "
                f"got {self.scheduler!r}"
            )

    @property
    def remote(self) -> bool:
        """The run computes elsewhere than in this process (a client or an address)."""
        return self.client is not None or self.scheduler not in (None, "threads")

    @property
    def threads(self) -> bool:
        """The run computes on Dask's threaded scheduler in this process."""
        return self.client is None and self.scheduler == "threads"


@dataclass(frozen=True)
class RunSpec:
    """A prepared run: its settings resolved against the input and the model.

    ``settings`` has every default filled in (tile, overlap, spacing, dtype; ``chunks`` the
    output chunk shape zyx, z 1 for a 2D input, which runs as one z slice). The tasks open
    the input and output stores themselves from the paths here. ``chunk_hook(index)`` is
    called at the start of every chunk task (instrumentation). ``enhancer_factory(spec)``,
    when given, makes the Enhancer the tasks use in place of the checkpoint's (benchmarks:
    a network that costs nothing; see :func:`emdiffuse.pipeline.runtime.spec_enhancer`).
    """

    settings: RunSettings
    input_path: str
    input_level: int
    input_voxel_size: tuple[float, ...] | None
    input_ndim: int  # 2 (yx, run as one z slice) or 3
    checkpoint: str
    lattice: Lattice
    output_path: str
    normalization: Normalization  # the target's: model space -> output intensities
    checkpoint_sha256: str | None = None  # the run record's hash: workers load exactly this
    variant: str = ""
    scale_factor: int = 1
    output_voxel_size: tuple[float, ...] = ()  # nm, zyx or yx as the input
    output_translation: tuple[float, ...] = ()
    chunk_hook: Callable[[tuple], None] | None = None
    # the condition's: input intensities -> model space (None: the target's, ``normalization``)
    condition_normalization: Normalization | None = None
    # what the uncertainty image holds (samples >= 2): the model's calibration record, or
    # None for the plain standard deviation over samples (models.calibration); samples=0:
    # the record when it holds the error head's ``mean_interval``, else None (no image)
    calibration: Any = None
    model_kind: str = "sr3"  # "residual": a mean network, evaluated once per tile
    # how much two samples' residual parts of the same content correlate: the residuals'
    # blend (pipeline.blend). The model's calibration record when the run samples as it was
    # measured, 0 without residual texture, None until measured before the run
    # (pipeline.correlation.with_correlation)
    residual_correlation: float | None = 0.0
    # where that value came from, in words for the plan: "the model's calibration", "this
    # run's measurement", "the run record" (a resumed run), "" (no residual texture)
    correlation_source: str = ""
    # the calibrated half-widths' factor for the run's sampling: the RMS spread of samples
    # drawn as the calibration was fitted over the run's own, on the same pilot tiles. 1.0
    # when the run samples as the calibration was fitted (or writes no calibrated
    # intervals), None until measured before the run (pipeline.correlation.with_correlation)
    interval_ratio: float | None = 1.0
    # the noise schedule the sampler walks (the model's inference schedule, else its training
    # schedule) and that fact in words; None for specs built without a model config
    sampling_schedule: dict | None = None
    sampling_schedule_text: str = ""
    enhancer_factory: Callable[[RunSpec], Any] | None = None

    @property
    def chunks(self) -> tuple[int, int, int]:
        """The output chunk shape (zyx)."""
        return self.settings.chunks

    @property
    def task_chunks(self) -> tuple[int, int, int]:
        """The output region of one task (zyx): ``chunks_per_task`` output chunks along
        each axis, cut to the volume; a multiple of :attr:`chunks` except at the far
        border, so a task writes whole chunks of the store."""
        factors = self.settings.chunks_per_task
        if isinstance(factors, int):
            factors = (factors,) * 3
        return tuple(
            min(c * f, s)
            for c, f, s in zip(self.chunks, factors, self.lattice.output_shape, strict=True)
        )

    def chunks_in_task(self, index: Sequence[int]) -> list[tuple[int, int, int]]:
        """The output chunk indices inside task ``index`` (of the :attr:`task_chunks` grid),
        in C order."""
        shape = self.lattice.output_shape
        ranges = []
        for i, t, c, s in zip(index, self.task_chunks, self.chunks, shape, strict=True):
            lo, hi = int(i) * t, min((int(i) + 1) * t, s)
            ranges.append(range(lo // c, -(-hi // c)))
        return [(a, b, d) for a in ranges[0] for b in ranges[1] for d in ranges[2]]

    def task_of(self, chunk: Sequence[int]) -> tuple[int, int, int]:
        """The task index (of the :attr:`task_chunks` grid) holding output chunk ``chunk``."""
        return tuple(
            int(i) * c // t for i, c, t in zip(chunk, self.chunks, self.task_chunks, strict=True)
        )

    @property
    def input_normalization(self) -> Normalization:
        """The map of the input (the condition) into model space."""
        return self.condition_normalization or self.normalization

    @property
    def mean_only(self) -> bool:
        """``samples=0``: the posterior mean only (one network evaluation per tile)."""
        return self.settings.samples == 0

    @property
    def mean_uncertainty(self) -> bool:
        """``samples=0`` with a model whose error head is calibrated: the uncertainty image
        holds the posterior mean's interval half-widths from the error head."""
        return self.mean_only and bool(self.calibration) and "mean_interval" in self.calibration

    @property
    def writes_uncertainty(self) -> bool:
        """Whether the run writes the ``uncertainty`` image: 2 samples or more, or the mean
        with a calibrated error head (:attr:`mean_uncertainty`)."""
        return self.settings.samples > 1 or self.mean_uncertainty

    @property
    def shares_mean(self) -> bool:
        """The model's mean comes from its own network, the same for every sample: computed
        once per tile and reused."""
        return self.model_kind == "residual"

    @property
    def uncertainty_path(self) -> str:
        return f"{self.output_path}/uncertainty"

    @property
    def output_axes(self) -> str:
        return "zyx" if self.input_ndim == 3 else "yx"

    def image_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """A zyx shape as the output image has it (yx for a 2D input)."""
        return tuple(shape) if self.input_ndim == 3 else tuple(shape[1:])

    def record(self) -> dict:
        """The run record (``run.json``): what the run computes. Device, precision, batch
        size and scheduling are left out: a run resumes on any of them."""
        s = self.settings
        path = self.input_path
        return {
            "input": os.path.abspath(path) if "://" not in path else path,
            "input_level": int(self.input_level),
            "input_shape": list(map(int, self.image_shape(self.lattice.input_shape))),
            "model_sha256": self.checkpoint_sha256,
            "variant": self.variant,
            "scale_factor": int(self.scale_factor),
            "steps": int(s.steps),
            "samples": int(s.samples),
            "seed": int(s.seed),
            "tile": int(s.tile),
            "overlap": int(s.overlap),
            "sampler": s.sampler,
            "spacing": s.spacing,
            **({} if s.start_noise is None else {"start_noise": float(s.start_noise)}),
            **(
                {}
                if self.sampling_schedule is None
                else {"sampling_schedule": dict(self.sampling_schedule)}
            ),
            "chunks": list(map(int, s.chunks)),
            "normalization": self.normalization.to_dict(),
            **self._condition_record(),
            "dtype": str(np.dtype(s.dtype)),
            "output_shape": list(map(int, self.lattice.output_shape)),
            # only when it blends otherwise than records without it did
            **({"residual_correlation": self.residual_correlation} if self.residual_correlation else {}),
            **({"interval_ratio": self.interval_ratio} if self.interval_ratio != 1.0 else {}),
            # intervals at another level than the model's calibrated one
            **({} if s.interval_level is None else {"interval_level": s.interval_level}),
        }

    def _condition_record(self) -> dict:
        """The condition's range when it differs from the target's (a record with one range,
        ``normalization``, is a run that maps input and output alike, as older records do)."""
        cond = self.condition_normalization
        if cond is None or cond == self.normalization:
            return {}
        return {"condition_normalization": cond.to_dict()}
