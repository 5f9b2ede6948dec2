"""`emdiffuse train`: train a model on OME-Zarr / TIFF data (see emdiffuse.training.trainer)."""

from __future__ import annotations

import argparse

from emdiffuse.errors import InputError

INTERRUPTED = "interrupted; rerun with --resume to continue from the last saved checkpoint"
HELP = "train a denoise / super-resolve / isotropic model on OME-Zarr or TIFF data"
DESCRIPTION = (
    "Train a diffusion model from patches read straight from OME-Zarr (or TIFF). "
    "--data: NOISY,CLEAN for denoise; LOW,HIGH or HIGH alone for super-resolve (the low image "
    "is then synthesised by blur + downsampling); one isotropic volume for isotropic "
    "(vEMDiffuse-i); the anisotropic volume itself for anisotropic (vEMDiffuse-a). "
    "Writes OUT/model.safetensors (EMA weights + config), resumable checkpoints, "
    "scalars.csv and validation PNGs. Multi-GPU: torchrun --nproc-per-node N -m emdiffuse.cli "
    "train ..."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", required=True, choices=("denoise", "super-resolve", "isotropic", "anisotropic")
    )
    parser.add_argument("--data", required=True, help="comma-separated sources, see above")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", default="tiny", help="model preset: tiny, small, reference")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--patch", type=int, default=64, help="patch side on the output grid")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--prediction", choices=("eps", "x0", "v"), default="v")
    parser.add_argument("--sampler", default="ddim", help="validation sampler")
    parser.add_argument("--val-steps", type=int, default=4, help="validation sampler steps")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--factor", type=int, default=None, help="scale factor k")
    parser.add_argument(
        "--axis", choices=("y", "x", "both"), default="both", help="anisotropic: rows, cols"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--init", default=None, help="fine-tune from this checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--voxel-size", default=None, help="z,y,x nm when the data does not say (TIFF)"
    )
    parser.add_argument("--time-limit", type=float, default=None, help="stop after N seconds")
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
    from emdiffuse.training.trainer import train

    path = train(
        args.task,
        args.data,
        args.out,
        size=args.size,
        steps=args.steps,
        batch_size=args.batch_size,
        patch=args.patch,
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        grad_clip=args.grad_clip,
        prediction=args.prediction,
        sampler=args.sampler,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        init=args.init,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        factor=args.factor,
        axis=args.axis,
        val_fraction=args.val_fraction,
        workers=args.workers,
        val_steps=args.val_steps,
        lr_schedule=args.lr_schedule,
        voxel_size=_voxel_size(args.voxel_size),
        time_limit=args.time_limit,
    )
    print(f"wrote {path}")
    return 0
