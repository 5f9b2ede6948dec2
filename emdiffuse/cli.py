"""The `emdiffuse` command: a thin argparse front over the library.

Each subcommand lives in `emdiffuse/_cli/<name>.py` with `HELP`, `add_arguments(parser)` and
`run(args) -> int` (and optionally `IO_ERROR_HINT`, what to do after an I/O failure, and
`INTERRUPTED`, what to say after Ctrl-C).

What the library logs (the ``emdiffuse`` loggers) is shown on stderr: notes as plain lines,
warnings as ``emdiffuse COMMAND: warning: ...``; ``--log-level`` chooses how much (default
info). ``python -m emdiffuse`` is the same command.

Exit codes, each failure reported on one line of stderr without a traceback:

- 0: done.
- 2: bad input (`emdiffuse.errors.InputError`, or a bad option): what is wrong and what to do.
  Nothing has been written.
- 74 (`EX_IOERR` of sysexits.h): the operating system refused a read or write during the run
  (disk full, file too large, output folder gone or read-only). What was finished is kept:
  `enhance` continues with `--resume` once the cause is fixed.
- 130: interrupted (Ctrl-C); `enhance` and `train` continue with `--resume`.
- 143 (128 + SIGTERM): terminated by SIGTERM (`kill`, a cancelled SLURM job), handled like
  Ctrl-C: the run stops cleanly and continues with `--resume`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

from emdiffuse import __version__
from emdiffuse.errors import InputError

EXIT_INPUT = 2
EXIT_IO = 74  # EX_IOERR (sysexits.h)
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
DEFAULT_IO_HINT = "fix the cause (free disk space, permissions) and run again"
EPILOG = (
    "exit codes: 0 done; 2 bad input (nothing written); 74 an I/O failure during the run "
    "(disk full, output unwritable: what was finished is kept, `enhance --resume` continues); "
    "130 interrupted, 143 terminated by SIGTERM (`enhance --resume` continues). Errors are "
    "reported on one line."
)

# name -> module under emdiffuse._cli; order is the order in --help.
COMMANDS = {
    "demo": "demo",
    "synth": "synth",
    "convert": "convert",
    "info": "info",
    "enhance": "enhance",
    "train": "train",
    "register": "register",
    "import-reference": "import_reference",
    "view": "view",
}
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every
    ``except KeyboardInterrupt`` cleanup (closing a cluster, keeping finished chunks) runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops the main thread as Ctrl-C does (as :class:`Terminated`).
    Only from the main thread, where signal handlers can be set and run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StderrLines(logging.Handler):
    """The library's log records on the current ``sys.stderr``: notes (info) as plain lines,
    anything else as ``<prefix><level>: <message>`` (e.g. ``emdiffuse enhance: warning: ...``)."""

    def __init__(self, prefix: str, level: int = logging.NOTSET):
        super().__init__(level)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno != logging.INFO:
                message = f"{self.prefix}{record.levelname.lower()}: {message}"
            print(message, file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


@contextlib.contextmanager
def log_to_stderr(level: str = DEFAULT_LOG_LEVEL, prefix: str = "emdiffuse: ") -> Iterator[None]:
    """Within the block, the ``emdiffuse`` loggers' records at ``level`` and above are shown
    on stderr (:class:`StderrLines`), and only there."""
    logger = logging.getLogger("emdiffuse")
    handler = StderrLines(prefix)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` option (the command's and the workflow scripts')."""
    parser.add_argument(
        "--log-level",
        default=DEFAULT_LOG_LEVEL,
        type=str.lower,
        choices=LOG_LEVELS,
        help=f"how much to say on stderr: {', '.join(LOG_LEVELS)} (default {DEFAULT_LOG_LEVEL})",
    )


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"emdiffuse._cli.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"emdiffuse._cli.{module_name}":
                raise
    return modules


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (what is wrong, where to read more)
    and exit 2, like every other bad input; its subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(EXIT_INPUT, f"{self.prog}: error: {text}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="emdiffuse",
        description="Diffusion models that enhance electron microscopy volumes "
        "(denoise, super-resolve, isotropic reconstruction) over OME-Zarr.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"emdiffuse {__version__}")
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        command_parser = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP)
        )
        module.add_arguments(command_parser)
        command_parser.set_defaults(
            _run=module.run,
            _io_hint=getattr(module, "IO_ERROR_HINT", DEFAULT_IO_HINT),
            _interrupted=getattr(module, "INTERRUPTED", "interrupted"),
        )
    return parser


def describe_os_error(error: OSError) -> str:
    """``[Errno 28] No space left on device: '/data/out.zarr/0/c/1/0/0'`` on one line."""
    text = error.strerror or str(error) or type(error).__name__
    if error.errno is not None and error.strerror:
        text = f"[Errno {error.errno}] {text}"
    if error.filename is not None:
        text += f": {str(error.filename)!r}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a usage error, already reported on one line
        if stop.code != EXIT_INPUT:
            raise  # --help and --version exit 0 as usual
        return EXIT_INPUT
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with sigterm_as_interrupt(), log_to_stderr(args.log_level, f"emdiffuse {args.command}: "):
            return int(args._run(args) or 0)
    except InputError as error:
        message = " ".join(str(error).split())  # always one line
        print(f"emdiffuse {args.command}: error: {message}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as error:
        print(
            f"emdiffuse {args.command}: error: I/O failed ({describe_os_error(error)}); "
            f"{args._io_hint}",
            file=sys.stderr,
        )
        return EXIT_IO
    except Terminated:
        said = args._interrupted.replace("interrupted", "interrupted by SIGTERM", 1)
        print(f"emdiffuse {args.command}: {said}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"emdiffuse {args.command}: {args._interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
