"""`emdiffuse import-reference`: a reference EMDiffuse checkpoint -> our .safetensors."""

from __future__ import annotations

import argparse

from emdiffuse.errors import InputError

HELP = "convert a reference EMDiffuse *_Network(_ema).pth and its JSON config to .safetensors"
DESCRIPTION = (
    "Convert weights written by the reference EMDiffuse code (its *_Network.pth or "
    "*_Network_ema.pth, read without executing code) and the JSON config they were trained "
    "with into an emdiffuse checkpoint that `emdiffuse enhance --model` uses. The reference "
    "samples with *_Network.pth (netG); its EMA copy *_Network_ema.pth imports too but is "
    "not what the reference's results came from. The checkpoint stores the config's "
    "inference schedule (beta_schedule.test), which sampling walks: `--sampler ddpm` with --steps at "
    "that schedule's length (printed; 1000 in the published configs but EMDiffuse-n-big's "
    "500) reproduces the reference's sampler step for step. "
    "Intensities: the reference maps 8-bit 0..255 to [-1, 1]; --low/--high change that."
)
VARIANTS = ("emdiffuse-n", "emdiffuse-r", "vemdiffuse-i", "vemdiffuse-a")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "network",
        help="reference weights, e.g. best_Network.pth (netG: what the reference samples with) "
        "or best_Network_ema.pth (its EMA copy)",
    )
    parser.add_argument("config", help="reference JSON config, e.g. config/EMDiffuse-n.json")
    parser.add_argument("output", help="output checkpoint (.safetensors; a .json is written beside it)")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="model variant (default: from the config's experiment name; needed where it is unclear)",
    )
    parser.add_argument(
        "--scale-factor",
        type=int,
        default=None,
        help="xy factor of a super-resolution model (required: the reference config lacks it); "
        "z factor of a vEMDiffuse model (default: the config's z_times)",
    )
    parser.add_argument("--low", type=float, default=None, help="raw intensity mapped to -1 (default 0)")
    parser.add_argument("--high", type=float, default=None, help="raw intensity mapped to +1 (default 255)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint that emdiffuse wrote"
    )


def _refuse_outputs(args: argparse.Namespace) -> None:
    """The checkpoint and the config written beside it may replace only a checkpoint that
    emdiffuse wrote (with --overwrite), never an input."""
    # imported when the command runs: `emdiffuse --help` must not load torch, Dask and zarr
    from emdiffuse.io import refuse_output
    from emdiffuse.models.checkpoints import sidecar_path

    reads = [("reference weights", args.network), ("reference config", args.config)]
    refuse_output(args.output, overwrite=args.overwrite, reads=reads, kind="checkpoint")
    refuse_output(
        sidecar_path(args.output),
        overwrite=args.overwrite,
        reads=reads,
        kind="checkpoint",
        name=f"the config written beside {args.output},",
    )


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: `emdiffuse --help` must not load torch
    from emdiffuse.models.checkpoints import config_from_file
    from emdiffuse.models.reference import (
        convert_reference_checkpoint,
        describe_reference_weights,
    )

    _refuse_outputs(args)

    normalization = None
    if args.low is not None or args.high is not None:
        low = 0.0 if args.low is None else args.low
        high = 255.0 if args.high is None else args.high
        if not low < high:
            raise InputError(f"--low {low} must be below --high {high}")
        normalization = {"low": low, "high": high}
    path = convert_reference_checkpoint(
        args.network,
        args.config,
        args.output,
        variant=args.variant,
        scale_factor=args.scale_factor,
        normalization=normalization,
        overwrite=args.overwrite,
    )
    config = config_from_file(path)
    print(f"wrote {path}: {config.describe()}, intensities {config.normalization['low']:g}.."
          f"{config.normalization['high']:g} -> [-1, 1]")  # fmt: skip
    print(f"weights: {describe_reference_weights(args.network)}")
    print(f"sampling schedule: {config.describe_sampling()}")
    return 0
