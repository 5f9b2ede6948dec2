"""Shared argument handling for the workflow scripts (run them, don't import this).

The options are the `emdiffuse enhance` command's own (one declaration:
``emdiffuse._cli.enhance.add_arguments``) and build the same run settings; the scripts add
only that they show the Dask dashboard link and run on a cluster they open here: the
scheduler at ``--scheduler-address``, or a LocalCluster started as `emdiffuse enhance`
starts one (one worker per GPU, else ``--workers`` CPU worker processes, 2 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from emdiffuse._cli import enhance as enhance_cli
from emdiffuse.cli import add_log_level, log_to_stderr
from emdiffuse.errors import InputError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    enhance_cli.add_arguments(p)
    add_log_level(p)
    return p


@contextlib.contextmanager
def client_for(args: argparse.Namespace):
    """A distributed Client on the given scheduler (an error when it does not answer within
    --connect-timeout), or on a LocalCluster started here; None with --threads (Dask's
    threads in this process). Closed at the end."""
    # imported here: the options above are read (and --help answered) without loading Dask
    from emdiffuse.pipeline.cluster import close_owned, make_client

    scheduling = enhance_cli.scheduling(args)
    if scheduling.threads:
        yield None
        return
    client = make_client(scheduling)
    try:
        yield client
    finally:
        close_owned(client)


def run(args: argparse.Namespace) -> None:
    """Enhance ``args.input`` into ``args.output`` on the chosen cluster and say where it went.
    Bad input (an unreachable scheduler included) ends the script with one line, exit 2."""
    try:
        with log_to_stderr(args.log_level, prefix=""):
            _run(args)
    except InputError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> None:
    with client_for(args) as client:
        if client is not None:
            print(f"Dask dashboard: {client.dashboard_link}")
        result = enhance_cli.enhance_from_args(args, client=client)
    if not args.dry_run:
        print(f"wrote {args.output}: {dict(result.sizes)} (view: emdiffuse view {args.output})")
