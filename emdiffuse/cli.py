"""The `emdiffuse` command: a thin argparse front over the library.

Each subcommand lives in `emdiffuse/_cli/<name>.py` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Bad input raises `emdiffuse.errors.InputError`: printed on one line,
exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from emdiffuse import __version__
from emdiffuse.errors import InputError

# name -> module under emdiffuse._cli; order is the order in --help.
COMMANDS = {
    "demo": "demo",
    "synth": "synth",
    "convert": "convert",
    "info": "info",
    "enhance": "enhance",
    "train": "train",
    "register": "register",
    "view": "view",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"emdiffuse._cli.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"emdiffuse._cli.{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emdiffuse",
        description="Diffusion models that enhance electron microscopy volumes "
        "(denoise, super-resolve, isotropic reconstruction) over OME-Zarr.",
    )
    parser.add_argument("--version", action="version", version=f"emdiffuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        command_parser = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP)
        )
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except InputError as error:
        print(f"emdiffuse {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"emdiffuse {args.command}: interrupted; finished chunks are kept, rerun with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
