"""Prepare a run: check the input, the model and the output, and resolve the settings
against them into a :class:`~emdiffuse.pipeline.settings.RunSpec`. Nothing is written.

Output grid and voxel size per task (input voxel size ``(vz, vy, vx)`` nm):

- denoise: same grid, same voxel size.
- super-resolution ×k: ``(nz, k*ny, k*nx)``, voxel ``(vz, vy/k, vx/k)``; the translation
  moves by ``-(k-1)/(2k)`` input voxels in y and x so output voxel centres tile the input
  voxels.
- isotropic ×k: ``((nz-1)*k + 1, ny, nx)``, voxel ``(vz/k, vy, vx)``; input slice i is
  output slice ``i*k`` unchanged; the ``k - 1`` slices between come from the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io import Volume, check_finite, open_volume, refuse_output
from emdiffuse.models.calibration import at_level
from emdiffuse.models.checkpoints import check_expected, read_checkpoint
from emdiffuse.models.device import resolve_device
from emdiffuse.models.sampler_names import FITTED
from emdiffuse.models.step_fit import fitted_alphas
from emdiffuse.pipeline.correlation import calibrated_correlation, calibrated_ratio
from emdiffuse.pipeline.intensity import run_normalization, warn_if_far_from_training_range
from emdiffuse.pipeline.lattice import Lattice
from emdiffuse.pipeline.preflight import check_device, check_tile_memory
from emdiffuse.pipeline.settings import (
    DEFAULT_CHUNK_YX,
    DEFAULT_OVERLAP_FRACTION,
    DEFAULT_TILE_MAX,
    RunSettings,
    RunSpec,
    Source,
    tile_batch,
)


def run_calibration(
    calibration: dict | None, samples: int, level: float | None = None
) -> dict | None:
    """The calibration record a run uses for its uncertainty image: the model's for 2 samples
    or more; for the mean alone (``samples=0``) only one that holds the error head's
    ``mean_interval``; else None. ``level``: its intervals at that level
    (:func:`~emdiffuse.models.calibration.at_level`; None: the model's own), refused
    (InputError) when the run writes no calibrated intervals."""
    used = None
    if calibration and (samples >= 2 or (samples == 0 and "mean_interval" in calibration)):
        used = calibration
    if level is None:
        return used
    if used is None:
        raise InputError(
            f"--interval-level sets the level of calibrated intervals, which this run does "
            f"not write: {_why_no_intervals(calibration, samples)}; leave it out"
        )
    return at_level(used, level)


def _why_no_intervals(calibration: dict | None, samples: int) -> str:
    if not calibration:
        return "the model stores no calibration (its uncertainty image is the samples' std)"
    if samples == 1:
        return "one sample has no uncertainty image (use --samples 0 or 2 or more)"
    return "the model has no calibrated error head for the mean alone (use --samples 2 or more)"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def choose_tile(
    output_yx: tuple[int, int], multiple: int, xy_scale: int, tile: int | None, overlap: int | None
) -> tuple[int, int]:
    """Tile and overlap on the output grid (checked against the model, defaults filled in).

    Default tile: the smallest multiple of ``multiple`` covering the larger yx side, at most
    256 (rounded up to ``multiple``); default overlap: ``DEFAULT_OVERLAP_FRACTION`` (3/32) of
    the tile but at least 16 voxels (a quarter of a tile under 64), rounded down to a multiple
    of ``xy_scale`` (24 of 256: about 1.27 computed voxels per output voxel on large slices,
    with the blend's ramp over those 24 voxels). A larger
    tile is capped to that covering side (the padded image: one tile per axis), and an overlap
    that no longer fits falls back to the default.
    """
    step = math.lcm(multiple, xy_scale)
    whole = _round_up(max(output_yx), step)  # one tile covers the (padded) image
    if tile is None:
        tile = min(whole, _round_up(DEFAULT_TILE_MAX, step))
    if tile > whole:
        tile = whole
        if overlap is not None and overlap >= tile:
            overlap = None
    if tile % step:
        raise InputError(
            f"tile {tile} must be a multiple of {step} for this model (output-grid voxels); "
            f"try --tile {_round_up(tile, step)}"
        )
    if overlap is None:
        # a ramp of at least 16 voxels (a quarter of a smaller tile) for small --tile values
        overlap = max(int(tile * DEFAULT_OVERLAP_FRACTION), min(16, tile // 4))
        overlap = overlap // xy_scale * xy_scale
    if not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must be >= 0 and smaller than the tile ({tile})")
    if overlap % xy_scale:
        raise InputError(
            f"overlap {overlap} must be a multiple of the super-resolution factor {xy_scale}"
        )
    return tile, overlap


def default_chunks(output_shape: tuple[int, int, int], z_scale: int) -> tuple[int, int, int]:
    """Output chunks: 2 input intervals (isotropic) or 4 slices along z, 512 in y and x."""
    nz, ny, nx = output_shape
    cz = 2 * z_scale if z_scale > 1 else 4
    return min(nz, cz), min(ny, DEFAULT_CHUNK_YX), min(nx, DEFAULT_CHUNK_YX)


def per_axis_zyx(value, ndim: int, what: str, fill: int = 1) -> tuple[int, ...]:
    """``value`` (one integer for every axis, or one per axis of the input) as zyx integers;
    a 2D input's z is ``fill``. ``what`` names the option in the error."""
    values = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(values) != ndim:
        raise InputError(
            f"{what} {value} must have one value per axis ({ndim}: "
            f"{'zyx' if ndim == 3 else 'yx'}) or be one integer"
        )
    return tuple(int(v) for v in ((fill, *values) if ndim == 2 else values))


def resolve_chunks(chunks, output_shape, z_scale: int, ndim: int) -> tuple[int, int, int]:
    """The output chunk shape zyx (z 1 for a 2D input) from the asked-for ``chunks``: None
    (the default), one size for every axis, or one per axis of the input."""
    if chunks is None:
        result = default_chunks(output_shape, z_scale)
    else:
        asked = per_axis_zyx(chunks, ndim, "chunks")
        result = tuple(min(c, s) for c, s in zip(asked, output_shape, strict=True))
    if ndim == 2:
        result = (1, *result[1:])
    return tuple(int(c) for c in result)


def resolve_chunks_per_task(factors, ndim: int) -> tuple[int, int, int]:
    """Output chunks per task, zyx (z 1 for a 2D input), from one factor for every axis
    or one per axis of the input."""
    return per_axis_zyx(factors, ndim, "chunks per task")


def output_geometry(volume: Volume, xy_scale: int, z_scale: int):
    """Output voxel size and translation (zyx nm, or yx for 2D)."""
    vs = tuple(float(v) for v in volume.voxel_size)
    tr = tuple(float(t) for t in (volume.translation or (0.0,) * len(vs)))
    if volume.ndim == 2:
        vs, tr = (1.0, *vs), (0.0, *tr)
    out_vs = (vs[0] / z_scale, vs[1] / xy_scale, vs[2] / xy_scale)
    shift = [
        0.0,
        -vs[1] * (xy_scale - 1) / (2 * xy_scale),
        -vs[2] * (xy_scale - 1) / (2 * xy_scale),
    ]
    out_tr = tuple(t + s for t, s in zip(tr, shift, strict=True))
    if volume.ndim == 2:
        return out_vs[1:], out_tr[1:]
    return out_vs, out_tr


def check_model_fits(volume: Volume, config, *, voxel_tolerance: float = 0.5) -> None:
    """Refuse a model whose task does not fit the input."""
    if config.dims != 2:
        raise InputError(
            f"{config.describe()} is a 3D network; enhance runs 2D networks slice by slice; "
            "use a 2D checkpoint"
        )
    if not config.isotropic:
        slices = volume.shape[0] if volume.ndim == 3 else 1
        if config.z_context and slices < 2:
            raise InputError(
                f"{config.describe()} reads {config.z_context} neighbouring slice(s) on each "
                "side but the input has one slice; give the whole z stack or use a model "
                "trained with --z-context 0"
            )
        return
    if volume.ndim != 3:
        raise InputError(
            f"{config.describe()} reconstructs z-slices but the input is 2D (yx); "
            "give a 3D (zyx) volume or a denoise/super-resolve checkpoint"
        )
    if volume.shape[0] < 2:
        raise InputError(
            f"{config.describe()} needs at least 2 z-slices, the input has "
            f"{volume.shape[0]}; give a 3D volume"
        )
    vz, vy, vx = volume.voxel_size
    ratio = float(vz) / float(min(vy, vx))
    if abs(ratio / config.z_scale - 1.0) > voxel_tolerance:
        raise InputError(
            f"the input's z step is {ratio:.3g}x its xy voxel size but {config.describe()} "
            f"fills in {config.z_scale}x; check --voxel-size or use a model for this factor"
        )


def _open_input(source: Source) -> Volume:
    volume = open_volume(source.input, level=source.level, voxel_size=source.voxel_size)
    if volume.ndim not in (2, 3):
        raise InputError(f"input has {volume.ndim} axes; enhance takes zyx or yx volumes")
    return volume


def _output_dtype(settings: RunSettings, volume: Volume) -> str:
    """The asked-for output dtype, else the input's (an integer or float type)."""
    dtype = np.dtype(settings.dtype or volume.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(f"output dtype {dtype} is not an integer or float type")
    return str(dtype)


def _layout(settings: RunSettings, volume: Volume, config) -> tuple[RunSettings, Lattice]:
    """The settings with tile, overlap and chunks resolved, and the run's tile lattice."""
    in_shape = tuple(volume.shape) if volume.ndim == 3 else (1, *volume.shape)
    k_xy = config.xy_scale
    multiple = math.lcm(config.multiple, k_xy)
    out_yx = (in_shape[1] * k_xy, in_shape[2] * k_xy)
    tile, overlap = choose_tile(out_yx, multiple, k_xy, settings.tile, settings.overlap)
    lattice = Lattice(in_shape, tile, overlap, xy_scale=k_xy, z_scale=config.z_scale,
                      z_context=config.z_context)  # fmt: skip
    chunks = resolve_chunks(settings.chunks, lattice.output_shape, config.z_scale, volume.ndim)
    per_task = resolve_chunks_per_task(settings.chunks_per_task, volume.ndim)
    settings = replace(
        settings, tile=tile, overlap=overlap, chunks=chunks, chunks_per_task=per_task
    )
    return settings, lattice


def prepare(
    source: Source,
    output,
    settings: RunSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    check_output: bool = True,
    local: bool = True,
    chunk_hook: Callable[[tuple], None] | None = None,
) -> RunSpec:
    """Check everything and resolve ``settings`` into the run's :class:`RunSpec`.

    The checkpoint is refused when made for another task or factor than ``source`` asks
    for; ``check_output``: the output may be written (:func:`~emdiffuse.io.refuse_output`,
    with ``resume``/``overwrite``). ``local``: the run computes on this machine, so its
    device and the memory of a tile batch are checked here (a remote cluster's workers are
    checked once connected). With ``normalize="model"``, an input whose sampled intensities
    lie far from the range the model was trained on for its input logs one warning.
    """
    if local:
        check_device(settings.device)
    volume = _open_input(source)
    dtype = _output_dtype(settings, volume)
    # one read: the config checked here and the hash recorded are of the same bytes
    config, _, model_sha256 = read_checkpoint(source.model)
    check_expected(config, expect_task=source.task, expect_scale_factor=source.scale_factor)
    check_model_fits(volume, config)
    settings = settings.with_sampling(config.step_schedules if config.residual else None)
    calibration = run_calibration(config.calibration, settings.samples, settings.interval_level)
    if calibration and settings.interval_level == float(config.calibration["level"]):
        settings = replace(settings, interval_level=None)  # the model's own: as if not given
    if settings.start_noise is not None and not config.residual:
        raise InputError(
            f"--start-noise is for mean-plus-residual models; {config.describe()} is the sr3 "
            "kind; leave it out"
        )
    if settings.spacing == FITTED and settings.samples >= 1:  # the model has that schedule
        fitted_alphas(config.step_schedules if config.residual else None, settings.sampler,
                      settings.steps, config.describe())  # fmt: skip
    if check_output:
        refuse_output(
            str(output), source.input, overwrite=overwrite, resume=resume,
            reads=[("model", source.model)],
        )  # fmt: skip
    check_finite(volume)
    settings, lattice = _layout(replace(settings, dtype=dtype), volume, config)
    if local:
        batch = min(tile_batch(settings.batch_size, resolve_device(settings.device).type),
                    lattice.n_tiles)  # fmt: skip
        check_tile_memory(config.unet, settings.tile, batch, settings.device)
    condition, target = run_normalization(
        settings.normalize, config, volume.data, seed=settings.seed
    )
    voxel, translation = output_geometry(volume, config.xy_scale, config.z_scale)
    textured = config.residual and settings.samples >= 1  # samples have a residual texture
    calibrated = calibrated_correlation(config.calibration, settings)
    spec = RunSpec(
        settings=settings,
        input_path=str(volume.path),
        input_level=int(source.level),
        input_voxel_size=tuple(float(v) for v in volume.voxel_size),
        input_ndim=volume.ndim,
        checkpoint=os.path.abspath(source.model),
        checkpoint_sha256=model_sha256,
        variant=config.variant,
        scale_factor=int(config.scale_factor),
        lattice=lattice,
        output_path=str(output),
        normalization=target,
        condition_normalization=condition,
        # fitted on the default sampling; another sampling's half-widths are rescaled by the
        # ratio of the two samplings' spreads, measured before the run (interval_ratio None)
        calibration=calibration,
        interval_ratio=calibrated_ratio(config.calibration, settings),
        model_kind=config.kind,
        # None: measured on the run's own tiles before the run (pipeline.correlation)
        residual_correlation=calibrated if textured else 0.0,
        correlation_source="the model's calibration" if textured and calibrated is not None else "",
        sampling_schedule=config.sampling_schedule,
        sampling_schedule_text=config.describe_sampling(),
        output_voxel_size=voxel,
        output_translation=translation,
        chunk_hook=chunk_hook,
    )
    if settings.normalize == "model":  # last: a warning, never followed by a refusal
        warn_if_far_from_training_range(volume.data, condition, seed=settings.seed)
    return spec
