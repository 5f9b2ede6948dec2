"""`emdiffuse enhance IN OUT --model CKPT`: enhance a volume into a multiscale OME-Zarr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from emdiffuse.errors import InputError
from emdiffuse.models.sampler_names import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    REFERENCE_MATCH,
    SAMPLER_NAMES,
    SPACING_NAMES,
)
from emdiffuse.pipeline.preflight import CONNECT_TIMEOUT

INTERRUPTED = "interrupted; finished chunks are kept, rerun with --resume"
IO_ERROR_HINT = (
    "finished chunks are kept: fix the cause (free disk space, permissions) and rerun the same "
    "command with --resume"
)
HELP = "enhance a volume (denoise, super-resolve, isotropic) with a trained model"
DESCRIPTION = (
    "Enhance IN (OME-Zarr or TIFF) with the model checkpoint into the OME-Zarr OUT, chunk by "
    "chunk on a Dask cluster (a LocalCluster by default: one worker per GPU, else CPU worker "
    "processes). Prints the plan (tiles, network evaluations, estimated time) first."
)


def _chunks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks {text!r}: give sizes like 4,512,512") from None
    return values


def _voxel_size(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"voxel size {text!r}: give nm per axis like 40,8,8 (zyx)"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input volume: OME-Zarr (path or URL) or TIFF")
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
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"sampler steps = network evaluations per sample (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        help="samples to average; 2 or more also writes the uncertainty (std) image",
    )
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument(
        "--tile", type=int, default=None, help="tile side on the output grid (voxels)"
    )
    parser.add_argument(
        "--overlap", type=int, default=None, help="tile overlap (voxels, output grid)"
    )
    parser.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        choices=list(SAMPLER_NAMES),
        help=f"sampler (default {DEFAULT_SAMPLER}; ddpm is the reference's ancestral sampler; "
        f"{REFERENCE_MATCH[0]} with --steps {REFERENCE_MATCH[1]} gives the reference's 1000-step "
        "result within 0.3 dB: see benchmarks/results/sampler_quality.md)",
    )
    parser.add_argument(
        "--spacing",
        default=None,
        choices=list(SPACING_NAMES),
        help="how the steps are placed between noise and clean: time (the reference's), "
        "logsnr, or karras (denser at low noise); default time for ddpm, logsnr for the others",
    )
    parser.add_argument(
        "--chunks", type=_chunks, default=None, help="output chunk shape, e.g. 4,512,512"
    )
    parser.add_argument(
        "--normalize",
        choices=["model", "auto"],
        default="model",
        help="intensity range: the model's training range, or percentiles of the input",
    )
    parser.add_argument(
        "--dtype", default=None, help="output dtype (default: the input's; e.g. float32)"
    )
    parser.add_argument(
        "--voxel-size",
        type=_voxel_size,
        default=None,
        help="input voxel size in nm (zyx), when the input does not say",
    )
    parser.add_argument("--level", type=int, default=0, help="input pyramid level (default 0)")
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)"
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument(
        "--batch-size", type=int, default=4, help="tiles per network call (default 4)"
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
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--quiet", action="store_true", help="no plan, no progress bar")


def run(args: argparse.Namespace) -> int:
    from emdiffuse.pipeline.enhance import enhance

    if args.threads and args.scheduler_address:
        raise InputError("pass either --threads or --scheduler-address, not both")
    scheduler = "threads" if args.threads else args.scheduler_address
    try:
        with warnings_on_stderr():
            result = _enhance(enhance, args, scheduler)
    except OSError:
        args._io_hint = _io_hint(args.output)
        raise
    if not args.dry_run:
        print(f"wrote {args.output}: {dict(result.sizes)} {result.dtype}")
    return 0


class _StderrHandler(logging.Handler):
    """Prints ``emdiffuse enhance: warning: ...`` on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"emdiffuse enhance: warning: {record.getMessage()}", file=sys.stderr)


@contextlib.contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """Within the block, the library's warnings (the ``emdiffuse`` logger) are one line each
    on stderr, and only there."""
    logger = logging.getLogger("emdiffuse")
    handler = _StderrHandler(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _io_hint(output: str) -> str:
    """What to do after an I/O failure: resume if the run was recorded, else start over."""
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


def _enhance(enhance, args: argparse.Namespace, scheduler):
    return enhance(
        args.input,
        args.model,
        args.output,
        steps=args.steps,
        samples=args.samples,
        seed=args.seed,
        tile=args.tile,
        overlap=args.overlap,
        sampler=args.sampler,
        spacing=args.spacing,
        chunks=args.chunks,
        resume=args.resume,
        overwrite=args.overwrite,
        normalize=args.normalize,
        dtype=args.dtype,
        progress=not args.quiet,
        scheduler=scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        voxel_size=args.voxel_size,
        level=args.level,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        dry_run=args.dry_run,
        task=args.task,
        scale_factor=args.factor,
        connect_timeout=args.connect_timeout,
    )
