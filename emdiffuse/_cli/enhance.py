"""`emdiffuse enhance IN OUT --model CKPT`: enhance a volume into a multiscale OME-Zarr.

:func:`add_arguments` is the one declaration of the enhance options (the workflow scripts
in ``workflows/`` reuse it); :func:`enhance_from_args` turns them into the run's records
(:class:`~emdiffuse.pipeline.settings.RunSettings`, ``Source``, ``Scheduling``) and runs.
Defaults are the settings' own.
"""

from __future__ import annotations

import argparse

from emdiffuse.errors import InputError
from emdiffuse.models.sampler_names import (
    DEFAULT_FIT_STEPS,
    DEFAULT_STEPS,
    REFERENCE_MATCH,
    RUN_SPACINGS,
    SAMPLER_NAMES,
)
from emdiffuse.pipeline.settings import (
    CONNECT_TIMEOUT,
    NORMALIZE_MODES,
    PRECISIONS,
    RunSettings,
    Scheduling,
    Source,
)

INTERRUPTED = "interrupted; finished chunks are kept, rerun with --resume"
IO_ERROR_HINT = (
    "finished chunks are kept: fix the cause (free disk space, permissions) and rerun the same "
    "command with --resume"
)
HELP = "enhance a volume (denoise, super-resolve, isotropic) with a trained model"
DESCRIPTION = (
    "Enhance IN (OME-Zarr, TIFF, HDF5, N5, neuroglancer precomputed or MRC) with the model checkpoint into the OME-Zarr OUT, chunk by "
    "chunk on a Dask cluster (a LocalCluster by default: one worker per GPU, else CPU worker "
    "processes). Prints the plan (tiles, network evaluations, estimated time) first."
)


def _chunks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks {text!r}: give sizes like 4,512,512") from None
    return values


def _chunks_per_task(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"chunks per task {text!r}: give one factor like 2, or one per axis like 1,2,2"
        ) from None
    return values[0] if len(values) == 1 else values


def _voxel_size(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"voxel size {text!r}: give nm per axis like 40,8,8 (zyx)"
        ) from None


_DEFAULT = RunSettings.defaults()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the enhance options; each setting's option has the setting's name."""
    _add_what(parser)
    _add_sampling(parser)
    _add_data(parser)
    _add_compute(parser)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--quiet", action="store_true", help="no plan, no progress bar")


def _add_what(parser: argparse.ArgumentParser) -> None:
    """Input, output and model."""
    parser.add_argument(
        "input",
        help="input volume, path or URL: OME-Zarr, TIFF, HDF5 (file.h5:/dataset), N5, "
        "neuroglancer precomputed (precomputed://...) or MRC",
    )
    parser.add_argument("output", help="output OME-Zarr path")
    parser.add_argument("--model", required=True, help="checkpoint (.safetensors)")
    parser.add_argument(
        "--task",
        choices=["denoise", "super-resolve", "isotropic"],
        default=None,
        help="refuse a checkpoint made for another task (default: the checkpoint's task)",
    )
    parser.add_argument(
        "--factor",
        type=int,
        default=None,
        help="refuse a checkpoint with another scale factor (super-resolve, isotropic)",
    )


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    """The sampler and the tiles it runs on."""
    parser.add_argument(
        "--steps",
        type=int,
        default=_DEFAULT["steps"],
        help=f"sampler steps = network evaluations per sample (default: {DEFAULT_FIT_STEPS} on "
        "the schedule a mean-plus-residual model fitted for the sampler at the end of "
        f"training, where it has one; else {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=_DEFAULT["samples"],
        help="0: the posterior mean only (1 network evaluation per tile, no texture sampled, "
        "fastest; with the uncertainty/ image of the mean's interval half-widths when the model "
        "has an error head); 1: one sample (the model's texture); N >= 2: the mean of N "
        "samples and the "
        "uncertainty/ image (calibrated interval half-widths when the model stores a "
        f"calibration, else the standard deviation) (default {_DEFAULT['samples']})",
    )
    parser.add_argument(
        "--interval-level",
        type=float,
        default=_DEFAULT["interval_level"],
        metavar="LEVEL",
        help="level of the calibrated intervals in uncertainty/, e.g. 0.95: one the model's "
        "calibration holds (0.5, 0.68, 0.8, 0.9, 0.95, 0.99 for models trained since they are "
        "stored; another is refused with the list); default: the level it was calibrated at",
    )
    parser.add_argument(
        "--seed", type=int, default=_DEFAULT["seed"], help=f"run seed (default {_DEFAULT['seed']})"
    )
    parser.add_argument(
        "--tile", type=int, default=_DEFAULT["tile"], help="tile side on the output grid (voxels)"
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=_DEFAULT["overlap"],
        help="tile overlap (voxels, output grid)",
    )
    sampler = _DEFAULT["sampler"]
    parser.add_argument(
        "--sampler",
        default=sampler,
        choices=list(SAMPLER_NAMES),
        help=f"sampler (default {sampler}; ddpm is the reference's ancestral sampler, and at "
        "the model's full schedule length, e.g. --steps 1000 for imported reference weights, "
        f"its loop step for step; {REFERENCE_MATCH[0]} with --steps {REFERENCE_MATCH[1]} came "
        "within 0.3 dB and in texture of that loop (ddpm over the reference's 1000-step test "
        "schedule) on a small v-prediction model, while on one trained the reference's way "
        "(eps-prediction) nothing at <= 10 steps did: see "
        "benchmarks/results/sampler_quality*.md)",
    )
    parser.add_argument(
        "--spacing",
        default=_DEFAULT["spacing"],
        choices=list(RUN_SPACINGS),
        help="how the steps are placed between noise and clean: time (the reference's), "
        "logsnr, karras (denser at low noise), or fitted: the schedule a mean-plus-residual "
        "model fitted at the end of training (train --fit-steps; by default 4 dpmpp_2m steps "
        "as close to the converged sample as 8 logsnr steps); default fitted at the steps "
        "the model fitted a schedule for, else time for ddpm, logsnr for the others",
    )
    parser.add_argument(
        "--start-noise",
        type=float,
        default=_DEFAULT["start_noise"],
        metavar="SIGMA",
        help="mean-plus-residual models: start each sample at noise level SIGMA instead of "
        "pure noise, so the steps add the fine texture around the mean (e.g. --sampler "
        "dpmpp_2m --steps 4 --spacing karras --start-noise 1.5: on held-out FlyEM the texture "
        "of a 1000-step sample at 4 evaluations, closer to the truth than a full sample; "
        "benchmarks/results/residual_nfe_start_noise.md); needs logsnr or karras spacing",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    """Output chunks and values, and what the input does not say about itself."""
    parser.add_argument(
        "--chunks",
        type=_chunks,
        default=_DEFAULT["chunks"],
        help="output chunk shape, e.g. 4,512,512",
    )
    parser.add_argument(
        "--normalize",
        choices=list(NORMALIZE_MODES),
        default=_DEFAULT["normalize"],
        help="intensity ranges: the model's (its input's training range maps the input, its "
        "target's the output), or auto: percentiles of the input map it, and the output range "
        "follows as the model's target range follows its input's",
    )
    parser.add_argument(
        "--dtype",
        default=_DEFAULT["dtype"],
        help="output dtype (default: the input's; e.g. float32)",
    )
    parser.add_argument(
        "--voxel-size",
        type=_voxel_size,
        default=None,
        help="input voxel size in nm (zyx), when the input does not say",
    )
    parser.add_argument(
        "--level", type=int, default=0, help="scale level of a multiscale input (default 0)"
    )


def _add_compute(parser: argparse.ArgumentParser) -> None:
    """Device, precision, batch and cluster."""
    parser.add_argument(
        "--device",
        default=_DEFAULT["device"],
        help=f"auto, cpu, cuda, cuda:1 ... (default {_DEFAULT['device']})",
    )
    parser.add_argument("--precision", default=_DEFAULT["precision"], choices=list(PRECISIONS))
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULT["batch_size"],
        help="tiles per network call (default: 16 on a GPU, 4 on a CPU)",
    )
    parser.add_argument(
        "--chunks-per-task",
        type=_chunks_per_task,
        default=_DEFAULT["chunks_per_task"],
        help="output chunks one task computes and writes: one factor for every axis or one "
        "per axis, e.g. 1,2,2 (default 1; larger tasks amortise the scheduler's cost per task)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=_DEFAULT["compile"],
        help="evaluate the network through torch.compile: each worker's first batch compiles "
        "for tens of seconds, then it runs faster (2.9x in bf16 on an H200); for large "
        "volumes on a GPU",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="LocalCluster workers (default: one per GPU, else 2)",
    )
    parser.add_argument("--threads-per-worker", type=int, default=None)
    parser.add_argument(
        "--scheduler-address",
        default=None,
        help="run on an existing Dask cluster, e.g. tcp://host:8786",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        help=f"seconds to wait for --scheduler-address to answer (default {CONNECT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="run in this process on Dask's threaded scheduler (small jobs)",
    )


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The run's settings from the parsed options (one option per setting, same name)."""
    return RunSettings(**{name: getattr(args, name) for name in RunSettings.names()})


def source(args: argparse.Namespace) -> Source:
    return Source(
        args.input, args.model, level=args.level, voxel_size=args.voxel_size, task=args.task,
        scale_factor=args.factor,
    )  # fmt: skip


def scheduling(args: argparse.Namespace, client=None) -> Scheduling:
    """Where the run computes: ``client`` if given, else as the options say."""
    if args.threads and args.scheduler_address:
        raise InputError("pass either --threads or --scheduler-address, not both")
    return Scheduling(
        client=client,
        scheduler="threads" if args.threads else args.scheduler_address,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        connect_timeout=args.connect_timeout,
    )


def enhance_from_args(args: argparse.Namespace, client=None):
    """Run the enhancement the options describe (on ``client`` when given)."""
    # imported here, not at the top: `emdiffuse --help` must not load torch, Dask or zarr
    from emdiffuse.pipeline.enhance import run_enhancement

    return run_enhancement(
        source(args), args.output, run_settings(args), scheduling(args, client),
        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
        dry_run=args.dry_run,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        result = enhance_from_args(args)
    except OSError:
        args._io_hint = _io_hint(args.output)
        raise
    if not args.dry_run:
        print(f"wrote {args.output}: {dict(result.sizes)} {result.dtype}")
    return 0


def _io_hint(output: str) -> str:
    """What to do after an I/O failure: resume if the run was recorded, else start over."""
    # imported here: only after a failure (run_record imports zarr and Dask through io)
    from emdiffuse.pipeline.run_record import read_run_config

    try:
        recorded = "://" not in output and read_run_config(output) is not None
    except (OSError, ValueError):
        recorded = False
    if recorded:
        return IO_ERROR_HINT
    return (
        "nothing was finished: fix the cause (free disk space, permissions, output location) "
        "and run again (with --overwrite if the output now exists)"
    )
