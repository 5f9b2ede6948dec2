"""`emdiffuse train`: train a model on OME-Zarr / TIFF data (see emdiffuse.training.trainer)."""

from __future__ import annotations

import argparse

from emdiffuse.errors import InputError
from emdiffuse.models.z_context import DEFAULT_Z_CONTEXT
from emdiffuse.training.settings import (
    AXES,
    LR_SCHEDULES,
    MEAN_INITS,
    OBJECTIVE_CHOICES,
    TASK_VARIANTS,
    TRAIN_PRECISIONS,
    defaults,
)

INTERRUPTED = "interrupted; rerun with --resume to continue from the last saved checkpoint"
HELP = (
    "train a denoise / super-resolve / isotropic model on OME-Zarr, TIFF, HDF5, N5, "
    "neuroglancer precomputed or MRC data"
)
DESCRIPTION = (
    "Train a diffusion model from patches read straight from OME-Zarr chunks (or TIFF, HDF5 "
    "file.h5:/dataset, N5, neuroglancer precomputed, MRC). "
    "--data: NOISY,CLEAN for denoise; LOW,HIGH or HIGH alone for super-resolve (the low image "
    "is then synthesised by blur + downsampling); one isotropic volume for isotropic "
    "(vEMDiffuse-i); the anisotropic volume itself for anisotropic (vEMDiffuse-a). "
    "Writes OUT/model.safetensors (EMA weights + config), resumable checkpoints, "
    "scalars.csv and validation PNGs. Multi-GPU: torchrun --nproc-per-node N -m emdiffuse.cli "
    "train ..."
)


# the options that are fields of TrainSettings (their defaults are read from there)
SETTINGS = (
    "size", "steps", "batch_size", "patch", "lr", "warmup", "lr_schedule", "ema_decay",
    "grad_clip", "prediction", "sampler", "val_steps", "val_every", "ckpt_every", "factor",
    "axis", "val_fraction", "workers", "init", "seed", "time_limit", "objective",
    "residual_scale", "mean_init", "mean_warmup", "residual_batch", "intensity_jitter",
    "precision", "z_context", "rotations", "calibration_level", "error_refit_steps",
    "lr_follows_time", "mean_ssim", "fit_steps",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = defaults()
    parser.add_argument("--task", required=True, choices=tuple(TASK_VARIANTS))
    parser.add_argument("--data", required=True, help="comma-separated sources, see above")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", default=d["size"], help="model preset: tiny, small, reference")
    parser.add_argument(
        "--objective", choices=OBJECTIVE_CHOICES, default=d["objective"],
        help="residual: mean plus residual, a regression network for the posterior mean and "
        "a diffusion UNet for the texture around it (enhance --samples 0 uses the mean "
        "alone); diffusion: one diffusion UNet, the reference's (SR3) kind; regression: a "
        "plain regression UNet (CARE-like baseline); auto (default): residual for a new "
        "model, the --init model's kind when fine-tuning, the run's own when resuming",
    )  # fmt: skip
    parser.add_argument(
        "--residual-scale", type=float, default=d["residual_scale"],
        help="residual objective: scale s of the residual (target - mean) / s in model space",
    )  # fmt: skip
    parser.add_argument(
        "--mean-init", choices=MEAN_INITS, default=d["mean_init"],
        help="residual objective: start the mean network at the least-squares per-voxel "
        "linear predictor of the training patches (default), or at the input itself",
    )  # fmt: skip
    parser.add_argument(
        "--mean-warmup", type=float, default=d["mean_warmup"], metavar="FRACTION",
        help="residual objective: the first FRACTION of the steps train the mean network "
        "alone (default 0: both networks from the first step)",
    )  # fmt: skip
    parser.add_argument(
        "--residual-batch", type=int, default=d["residual_batch"], metavar="N",
        help="residual objective: the residual network trains on the first N samples of "
        "each batch, the mean network on all (cheaper steps; default: the whole batch). "
        "For the best posterior mean from a short CPU run: --batch-size 16 --residual-batch 4 "
        "(the demo's recipe)",
    )  # fmt: skip
    parser.add_argument(
        "--mean-depth", type=int, default=None, metavar="N",
        help="residual objective: downsamplings of the mean network (default: the --size "
        "preset's, 2 for tiny, 3 for small and reference). Deeper sees more context and "
        "costs more per step: for a tiny model trained 20 min or more on a CPU, 3 scored "
        "higher than 2 (docs/tasks.md); not with --init, whose model keeps its own",
    )  # fmt: skip
    parser.add_argument(
        "--mean-ssim", type=float, default=d["mean_ssim"], metavar="W",
        help="residual objective: add W x (1 - SSIM) to the mean network's squared error: a "
        "mean with more local contrast (higher SSIM) for a little squared error (lower "
        "PSNR). Default 0: the posterior mean. Measured for runs of 20 min or more: 0.1, or "
        "0.05 with --z-context 1. The samples and intervals stay calibrated either way "
        "(docs/tasks.md)",
    )  # fmt: skip
    parser.add_argument(
        "--intensity-jitter", type=float, default=d["intensity_jitter"], metavar="FRACTION",
        help="brightness/contrast augmentation: a gain in 1 +- FRACTION and an offset in "
        "+- FRACTION/2 of the target's range, the same raw change for input and target "
        "(default %(default)s; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--rotations", action=argparse.BooleanOptionalAction, default=d["rotations"],
        help="random 90° rotations of the training patches (default); --no-rotations keeps "
        "the data's y and x apart, for EM whose two image axes differ (scan direction, FIB "
        "milling); flips are drawn either way",
    )  # fmt: skip
    parser.add_argument(
        "--z-context", type=int, default=d["z_context"], metavar="C",
        help="input slices the model reads on each side: isotropic tasks beyond the two "
        "bounding slices (0: the pair, as the reference; 1: four slices, +0.1 dB on FlyEM "
        "isotropic x4); denoise beyond the noisy slice (1: the slice and its two "
        "neighbours, for volumes whose slices have independent noise; docs/tasks.md). "
        f"Default: the --init model's, else {DEFAULT_Z_CONTEXT} for a new isotropic model "
        "and 0 for denoise",
    )  # fmt: skip
    parser.add_argument(
        "--calibration-level", type=float, default=d["calibration_level"], metavar="LEVEL",
        help="the level of the intervals fitted on held-out patches at the end of training "
        "(default %(default)s); 50, 68, 80, 90, 95 and 99 %% are stored as well, for enhance "
        "--interval-level",
    )  # fmt: skip
    parser.add_argument(
        "--error-refit-steps", type=int, default=d["error_refit_steps"], metavar="N",
        help="residual objective: steps of the error head's refit to the final mean at the "
        "end of training (default: as many as the run's, at most 2000; 0: none); a "
        "--time-limit run keeps the last 5 %% of its limit for it",
    )  # fmt: skip
    parser.add_argument(
        "--fit-steps", type=int, default=d["fit_steps"], metavar="N",
        help="residual objective: fit an N-step sampling schedule to the model on held-out "
        "patches at the end of training, which enhance then samples on by default "
        "(default %(default)s; 0: none)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=d["steps"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    parser.add_argument(
        "--patch", type=int, default=d["patch"], help="patch side on the output grid"
    )
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--warmup", type=int, default=d["warmup"])
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d["lr_schedule"])
    parser.add_argument("--ema-decay", type=float, default=d["ema_decay"])
    parser.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    parser.add_argument("--prediction", choices=("eps", "x0", "v"), default=d["prediction"])
    parser.add_argument("--sampler", default=d["sampler"], help="validation sampler")
    parser.add_argument(
        "--val-steps", type=int, default=d["val_steps"], help="validation sampler steps"
    )
    parser.add_argument("--val-every", type=int, default=d["val_every"])
    parser.add_argument("--ckpt-every", type=int, default=d["ckpt_every"])
    parser.add_argument("--factor", type=int, default=d["factor"], help="scale factor k")
    parser.add_argument(
        "--axis", choices=AXES, default=d["axis"], help="anisotropic: rows, cols"
    )
    parser.add_argument("--val-fraction", type=float, default=d["val_fraction"])
    parser.add_argument(
        "--workers", type=int, default=d["workers"], help="DataLoader worker processes"
    )
    parser.add_argument("--init", default=d["init"], help="fine-tune from this checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision", choices=TRAIN_PRECISIONS, default=d["precision"],
        help="autocast of the network: auto (default) is bf16 where the hardware computes it "
        "natively (CUDA GPUs with bf16, CPUs with Intel AMX or AVX512-BF16) and fp32 elsewhere",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument(
        "--voxel-size", default=None, help="z,y,x nm when the data does not say (TIFF)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=d["time_limit"], help="stop after N seconds"
    )
    parser.add_argument(
        "--lr-follows-time", action=argparse.BooleanOptionalAction, default=d["lr_follows_time"],
        help="with --time-limit, the cosine learning rate reaches its floor at the limit or at "
        "--steps, whichever comes first (default); --no-lr-follows-time schedules by steps "
        "alone, the same rates on any machine",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")


def _voxel_size(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--voxel-size {text!r}: give numbers in nm, e.g. 40,8,8") from None
    if len(values) == 1:
        values = values * 3
    if len(values) not in (2, 3) or any(v <= 0 for v in values):
        raise InputError(f"--voxel-size {text!r}: give 1, 2 or 3 positive sizes in nm (zyx)")
    return values


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: `emdiffuse --help` must not load torch
    from emdiffuse.training.trainer import train

    settings = {name: getattr(args, name) for name in SETTINGS}
    if args.mean_depth is not None:
        settings["mean_net"] = {"depth": args.mean_depth}
    path = train(
        args.task,
        args.data,
        args.out,
        device=args.device,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
        voxel_size=_voxel_size(args.voxel_size),
        **settings,
    )
    print(f"wrote {path}")
    return 0
