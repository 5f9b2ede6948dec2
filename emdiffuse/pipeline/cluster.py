"""The Dask cluster of a run: connect to a scheduler or start a LocalCluster, and close
what the run started, quietly.

A LocalCluster started here has one worker per GPU (each advertising ``GPU=1``, so the tile
tasks go there) or, without GPUs, ``workers`` CPU worker processes (2 by default). Its worker
processes ignore SIGINT and SIGTERM: a Ctrl-C in the terminal or a SIGTERM to the process
group (a cancelled SLURM job) stops only this process, which stops the run and closes the
cluster. After a Ctrl-C or a damaged input the shutdown chatter of ``distributed`` is hidden,
so the user reads one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import warnings

import torch
from distributed import Client, LocalCluster

from emdiffuse.errors import InputError
from emdiffuse.pipeline.settings import CONNECT_TIMEOUT, Scheduling

DEFAULT_CPU_WORKERS = 2


def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> Client:
    """A ``distributed.Client`` on the scheduler at ``address``, or InputError when it cannot
    be reached within ``timeout`` seconds."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not (math.isfinite(timeout) and timeout > 0)
    ):
        raise InputError(f"connect timeout must be a positive number of seconds, got {timeout!r}")
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise InputError(
            f"could not reach the Dask scheduler at {address} within {timeout:g} s ({error}); "
            "check the address and that the scheduler is running (--connect-timeout waits longer)"
        ) from None


def make_client(scheduling: Scheduling) -> Client:
    """A new Client: to ``scheduling.scheduler`` (an address), or on a LocalCluster (one
    worker per GPU with ``GPU=1``, else ``workers`` CPU worker processes) started here."""
    if scheduling.scheduler:
        return connect(scheduling.scheduler, scheduling.connect_timeout)
    if torch.cuda.is_available():
        kwargs = dict(
            n_workers=scheduling.workers or torch.cuda.device_count(), resources={"GPU": 1}
        )
    else:
        kwargs = dict(n_workers=scheduling.workers or DEFAULT_CPU_WORKERS)
    with _stop_signals_ignored_by_children(), warnings.catch_warnings():
        # When 8787 is taken the dashboard moves to a free port; the printed link says where.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
        cluster = LocalCluster(
            threads_per_worker=scheduling.threads_per_worker or 1, processes=True, **kwargs
        )
    return Client(cluster)


def expected_workers(scheduling: Scheduling) -> int:
    """How many tasks run at once (for the time estimate)."""
    if scheduling.client is not None:
        return max(1, len(scheduling.client.scheduler_info().get("workers", {})))
    if scheduling.threads:
        return max(1, scheduling.workers or 1)
    return scheduling.workers or (
        torch.cuda.device_count() if torch.cuda.is_available() else DEFAULT_CPU_WORKERS
    )


@contextlib.contextmanager
def _stop_signals_ignored_by_children():
    """Start worker processes with SIGINT and SIGTERM ignored (they inherit that), so a
    Ctrl-C in the terminal or a SIGTERM to the process group (a cancelled SLURM job) stops
    only this process, which stops the run and closes the cluster itself (its nannies end
    the workers). Only from the main thread (signals cannot be changed elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, signal.SIG_IGN) for s in stops]
    try:
        yield
    finally:
        for s, handler in zip(stops, previous, strict=True):
            signal.signal(s, handler)


def _drop_all_exit(record) -> bool:
    """Logging filter: distributed's internal ``AllExit`` of an abandoned gather."""
    exc = record.exc_info[1] if record.exc_info else None
    return type(exc).__name__ != "AllExit"


def drop_all_exit_logs() -> None:
    """Keep asyncio from logging, as "Task exception was never retrieved" with a traceback,
    the ``AllExit`` that distributed uses internally when a gather is abandoned (Ctrl-C)."""
    asyncio_log = logging.getLogger("asyncio")
    if _drop_all_exit not in asyncio_log.filters:
        asyncio_log.addFilter(_drop_all_exit)


def silence_distributed(level: int | None = None) -> int:
    """Set the ``distributed`` log level (default ERROR); return the previous one."""
    logger = logging.getLogger("distributed")
    previous = logger.level
    logger.setLevel(logging.ERROR if level is None else level)
    return previous


def quiet_shutdown(client, *, workers_too: bool) -> int:
    """After Ctrl-C the run stops on purpose: hide the shutdown chatter (cancelled tasks,
    workers killed while computing) so the user sees one line. ``workers_too``: on the
    workers as well (only for a cluster this run started). Returns this process's previous
    ``distributed`` log level, to restore after closing."""
    previous = silence_distributed()
    if workers_too:
        with contextlib.suppress(Exception):
            client.run(silence_distributed)
    return previous


def close_owned(owned) -> None:
    """Close a client this run made, and its LocalCluster if it started one."""
    cluster = getattr(owned, "cluster", None)
    # Our own workers are shut down on purpose: a heartbeat racing the scheduler's
    # exit must not print a worker traceback after a finished run.
    with contextlib.suppress(Exception):
        owned.run(silence_distributed, logging.CRITICAL)
    owned.close()
    if cluster is not None:
        cluster.close()
