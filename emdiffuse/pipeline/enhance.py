"""``enhance``: a model and a volume of any size -> an enhanced multiscale OME-Zarr.

Steps: build the run's settings (:class:`~emdiffuse.pipeline.settings.RunSettings`) once;
prepare the run (:mod:`~emdiffuse.pipeline.prepare`: open the input read-only and the
model, check that they fit, refuse an existing output unless overwrite/resume, fix the
intensity normalisation once, lay the global tile lattice and the output chunks); report
the plan; connect to or start the cluster (:mod:`~emdiffuse.pipeline.cluster`); create the
output (and the uncertainty image when ``samples >= 2``, or for the mean of a model with an
error head) and store the run record; run one
task per unfinished output chunk and one per block of tiles they need
(:mod:`~emdiffuse.pipeline.graph`, :mod:`~emdiffuse.pipeline.tasks`); build the pyramid and
write the metadata last.

What the run has to say (the plan, "already complete", the dashboard link, warnings) goes to
the ``emdiffuse`` loggers. The CLI shows them; an application that has not configured the
``emdiffuse`` logger sees them on stderr during the call, as it sees the progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from emdiffuse.errors import InputError
from emdiffuse.io import open_volume
from emdiffuse.pipeline import run_record as record
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.cluster import (
    close_owned,
    drop_all_exit_logs,
    expected_workers,
    make_client,
    quiet_shutdown,
    silence_distributed,
)
from emdiffuse.pipeline.correlation import needs_pilot, with_correlation
from emdiffuse.pipeline.graph import build_graph, run_graph
from emdiffuse.pipeline.lattice import chunk_box, iter_chunks
from emdiffuse.pipeline.outputs import create_outputs, finalize_outputs
from emdiffuse.pipeline.plan import Plan, estimate_plan, measure_seconds_per_evaluation
from emdiffuse.pipeline.preflight import check_worker_devices, device_problem
from emdiffuse.pipeline.prepare import prepare
from emdiffuse.pipeline.settings import (
    CONNECT_TIMEOUT,
    RunSettings,
    RunSpec,
    Scheduling,
    Source,
)
from emdiffuse.pipeline.stages import timed

log = logging.getLogger(__name__)
_DEFAULT = RunSettings.defaults()  # the API's defaults are the settings' own


def enhance(
    input,
    model,
    output,
    *,
    steps: int | None = _DEFAULT["steps"],
    samples: int = _DEFAULT["samples"],
    seed: int = _DEFAULT["seed"],
    tile: int | None = _DEFAULT["tile"],
    overlap: int | None = _DEFAULT["overlap"],
    client=None,
    sampler: str = _DEFAULT["sampler"],
    spacing: str | None = _DEFAULT["spacing"],
    start_noise: float | None = _DEFAULT["start_noise"],
    chunks=_DEFAULT["chunks"],
    resume: bool = False,
    overwrite: bool = False,
    normalize: str = _DEFAULT["normalize"],
    dtype=_DEFAULT["dtype"],
    progress: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    voxel_size=None,
    level: int = 0,
    device: str = _DEFAULT["device"],
    precision: str = _DEFAULT["precision"],
    batch_size: int | None = _DEFAULT["batch_size"],
    chunks_per_task: int | tuple[int, ...] = _DEFAULT["chunks_per_task"],
    compile: bool = _DEFAULT["compile"],
    interval_level: float | None = _DEFAULT["interval_level"],
    dry_run: bool = False,
    seconds_per_tile: float | None = None,
    chunk_hook: Callable[[tuple], None] | None = None,
    enhancer_factory: Callable[[RunSpec], Any] | None = None,
    task: str | None = None,
    scale_factor: int | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
):
    """Enhance ``input`` (OME-Zarr or TIFF) with checkpoint ``model`` into OME-Zarr ``output``.

    Returns the output as an ``xarray.DataArray`` (lazy, dims zyx or yx, coords in nm), or
    the :class:`~emdiffuse.pipeline.plan.Plan` when ``dry_run``.

    Scheduling: ``client`` (a ``distributed.Client``) if given; else ``scheduler="threads"``
    runs on Dask's threaded scheduler in this process (small jobs); ``scheduler`` an address
    (``tcp://...``) connects to that cluster; otherwise a LocalCluster is started (one
    worker per GPU, or ``workers`` CPU worker processes) and closed at the end.
    ``steps`` and ``spacing`` (None: the model's default sampling,
    :func:`~emdiffuse.models.sampler_names.default_sampling`): a mean-plus-residual model
    that fitted a few-step schedule for ``sampler`` walks it (4 ``fitted`` steps of
    ``dpmpp_2m``, the schedule its intervals were calibrated on); any other takes 8 steps on
    the sampler's own spacing. ``spacing`` places the steps: ``time``, ``logsnr``,
    ``karras`` or ``fitted`` (the model's stored schedule at that step count).
    ``start_noise`` (mean-plus-residual models, logsnr/karras spacing): each sample starts
    at noise level σ = ``start_noise`` instead of pure noise, so the steps add the fine
    texture around the mean (e.g. ``sampler="dpmpp_2m", steps=4, spacing="karras",
    start_noise=1.5``).
    ``samples``: 0 writes the posterior mean only (one network evaluation per tile, the
    fastest, regression-like; a model with a calibrated error head also writes
    ``uncertainty``: interval half-widths of the mean from the head's σ of its error); 1
    one sample (texture); N >= 2 the mean of N samples and,
    as the child image ``uncertainty``, the per-voxel spread over samples: the interval
    half-widths at the model's calibrated level when its checkpoint stores a calibration,
    else the standard deviation (the image's ``emdiffuse`` attributes say which).
    ``interval_level`` sets those intervals' level, one the calibration holds (50, 68, 80,
    90, 95 or 99 % for a model trained since they are stored; None: the calibrated one).
    ``resume`` continues an interrupted run with the same
    settings (finished chunks are skipped); ``overwrite`` replaces an existing output.
    ``chunks_per_task`` (one factor, or one per axis): output chunks one task computes
    and writes (larger tasks amortise the scheduler's cost per task; the output's chunks
    stay ``chunks``). ``compile`` evaluates the network through ``torch.compile`` (each
    worker's first batch compiles for tens of seconds; then 2.9× faster in bf16 on an H200:
    for large volumes on a GPU).
    ``batch_size``: tiles per network call (None: 16 on a GPU, 4 on a CPU).
    ``progress`` shows the plan and progress bars. ``chunk_hook(index)`` is called at the
    start of every chunk task (instrumentation). ``enhancer_factory(spec)`` makes the
    Enhancer the tasks use in place of the checkpoint's, once per worker process (for
    benchmarks: a network that costs nothing; the checkpoint still fixes the run's
    variant, ranges and record).
    ``task`` / ``scale_factor`` refuse a checkpoint made for another task or factor.
    Everything is checked before the output is created: options, input, model, output
    path, device, tile memory and, with ``scheduler`` an address, that the scheduler answers
    within ``connect_timeout`` seconds.
    """
    settings = RunSettings(
        sampler=sampler, steps=steps, spacing=spacing, start_noise=start_noise, samples=samples,
        seed=seed, tile=tile,
        overlap=overlap, chunks=chunks, normalize=normalize, dtype=dtype, device=device,
        precision=precision, batch_size=batch_size, chunks_per_task=chunks_per_task,
        compile=compile, interval_level=interval_level,
    )  # fmt: skip
    source = Source(
        input, model, level=level, voxel_size=voxel_size, task=task, scale_factor=scale_factor
    )
    scheduling = Scheduling(
        client=client, scheduler=scheduler, workers=workers,
        threads_per_worker=threads_per_worker, connect_timeout=connect_timeout,
    )  # fmt: skip
    return run_enhancement(
        source, output, settings, scheduling, resume=resume, overwrite=overwrite,
        progress=progress, dry_run=dry_run, seconds_per_tile=seconds_per_tile,
        chunk_hook=chunk_hook, enhancer_factory=enhancer_factory,
    )  # fmt: skip


def run_enhancement(
    source: Source,
    output,
    settings: RunSettings,
    scheduling: Scheduling,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    seconds_per_tile: float | None = None,
    chunk_hook: Callable[[tuple], None] | None = None,
    enhancer_factory: Callable[[RunSpec], Any] | None = None,
):
    """:func:`enhance` with its settings as records (the CLI and the workflow scripts build
    them from the CLI's options)."""
    if resume and overwrite:
        raise InputError("pass either resume or overwrite, not both")
    output = str(output)
    notes = progress or dry_run
    with _shown_on_stderr(notes):
        exists = Path(output).exists() if "://" not in output else False
        with timed("prepare"):
            spec = prepare(
                source, output, settings, resume=resume, overwrite=overwrite,
                check_output=not dry_run, local=not scheduling.remote, chunk_hook=chunk_hook,
            )  # fmt: skip
        if enhancer_factory is not None:
            spec = replace(spec, enhancer_factory=enhancer_factory)
        resuming = resume and exists
        done: set = set()
        if resuming:
            spec = _recorded_pilot(spec, output)
            record.check_run_config(output, spec.record())
            if record.is_complete(output):
                if notes:
                    log.info("%s: already complete", output)
                return open_volume(output).to_xarray()
            done = record.done_chunks(output)
        all_chunks = list(iter_chunks(spec.lattice.output_shape, spec.chunks))
        todo = [c for c in all_chunks if tuple(c) not in done]
        if notes:
            plan = _report_plan(
                spec, scheduling, len(all_chunks) - len(todo), todo, seconds_per_tile
            )
            if dry_run:
                return plan
        spec, client, owned = _start(
            spec, scheduling, create=not resuming, overwrite=overwrite or exists
        )
        if owned is not None and progress:
            log.info("dashboard: %s", client.dashboard_link)
        _execute(spec, todo, scheduling, client, owned, progress=progress, resuming=resuming)
        with timed("pyramid"):
            finalize_outputs(spec)
        record.mark_complete(output)
        return open_volume(output).to_xarray()


def _report_plan(
    spec: RunSpec, scheduling: Scheduling, done: int, todo: list, seconds_per_tile: float | None
) -> Plan:
    """Log the run's plan, with a time estimate from one network evaluation timed here (when
    ``seconds_per_tile`` — one sample of one tile, or its posterior mean with
    ``samples=0`` — is not given, something is left to run and the device is here)."""
    s = spec.settings
    per_evaluation = None
    if seconds_per_tile is not None and spec.mean_only:
        per_evaluation, seconds_per_tile = seconds_per_tile, None
    elif seconds_per_tile is None and todo and device_problem(s.device) is None:
        per_evaluation = measure_seconds_per_evaluation(
            runtime.spec_enhancer(spec), spec.lattice, mean_only=spec.mean_only
        )
    plan = estimate_plan(
        spec, done=done, seconds_per_tile=seconds_per_tile, workers=expected_workers(scheduling),
        seconds_per_evaluation=per_evaluation,
    )  # fmt: skip
    log.info("%s", plan.report())
    return plan


def _recorded_pilot(spec: RunSpec, output: str) -> RunSpec:
    """A resumed run whose residual correlation or interval ratio is measured (not given by
    the model's calibration) takes the value its record holds: the one its first part
    measured and used. A record without it ran with 0 (correlation) or 1 (ratio)."""
    stored = record.read_run_config(output) or {}
    for name, absent in (("residual_correlation", 0.0), ("interval_ratio", 1.0)):
        value = stored.get(name, absent)
        if getattr(spec, name) is not None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # left unknown: the record comparison names the difference
        spec = replace(spec, **{name: float(value)})
        if name == "residual_correlation":
            spec = replace(spec, correlation_source="the run record")
    return spec


def _start(spec: RunSpec, scheduling: Scheduling, *, create: bool, overwrite: bool):
    """Connect to (or start) the cluster, check its workers' device, measure the residual
    correlation when the model's calibration does not give it for this run's sampling
    (:func:`~emdiffuse.pipeline.correlation.with_correlation`, on a worker), then create the
    outputs and the run record (``create``: not when resuming). Returns ``(spec, client or
    None, the client this run made or None)``; a client made here is closed again on
    failure."""
    client, owned = scheduling.client, None
    if client is None and not scheduling.threads:  # connect (or start) before creating
        client = owned = make_client(scheduling)
    try:
        if scheduling.remote:
            check_worker_devices(client, spec.settings.device)
        if needs_pilot(spec):
            with timed("correlation"):
                spec = with_correlation(spec, client)
            log.debug("pilot: residual correlation %.3f, interval ratio %.3f",
                      spec.residual_correlation, spec.interval_ratio)  # fmt: skip
        if create:
            create_outputs(spec, overwrite=overwrite)
            record.write_run_config(spec.output_path, spec.record())
    except BaseException:
        if owned is not None:
            close_owned(owned)
        raise
    return spec, client, owned


def _execute(
    spec: RunSpec, todo: list, scheduling: Scheduling, client, owned, *, progress, resuming
) -> None:
    """Run the tasks of output chunks ``todo``; close a cluster this run made, whatever happens.
    After Ctrl-C or a damaged input the shutdown is quiet; a damaged input is re-raised
    once no task of ours still writes (:func:`_damaged`)."""
    if client is not None:
        drop_all_exit_logs()
    quieted = damaged = None
    try:
        # one task per cell of the task grid holding an unfinished chunk (chunks_per_task)
        tasks = list(dict.fromkeys(spec.task_of(c) for c in todo))
        with timed("graph"):
            graph, keys = build_graph(spec, tasks)
        threads = (scheduling.workers or 1) if scheduling.scheduler == "threads" else None
        boxes = (chunk_box(i, spec.lattice.output_shape, spec.task_chunks) for i in tasks)
        voxels = sum(math.prod(b - a for a, b in box) for box in boxes)
        with timed("execute"):
            run_graph(graph, keys, client=client, num_workers=threads, progress=progress,
                      voxels=voxels)  # fmt: skip
    except KeyboardInterrupt:
        if client is not None:
            quieted = quiet_shutdown(client, workers_too=owned is not None)
        raise
    except InputError as error:  # the input proved unreadable mid-run (a damaged chunk)
        damaged = error
        if client is not None:  # one line: no shutdown chatter of workers stopped mid-task
            quieted = quiet_shutdown(client, workers_too=owned is not None)
    finally:
        if owned is not None:
            close_owned(owned)
        if quieted is not None:
            silence_distributed(quieted)
    if damaged is not None:
        # No task of ours still writes (threads joined, own cluster closed): an output this
        # run created goes; one that outside workers may still write to, or a resumed one, stays.
        _damaged(
            spec.output_path, damaged, ours=not resuming and (client is None or owned is not None)
        )


def _damaged(output: str, damaged: InputError, *, ours: bool) -> None:
    """Raise the damaged input's error: the output goes when this run created it and only
    its own tasks wrote to it (``ours``), else its finished chunks are kept for --resume."""
    if ours and "://" not in output:
        shutil.rmtree(output, ignore_errors=True)
        raise damaged
    raise InputError(
        f"{damaged}; finished chunks are kept in {output}: repair the input, then rerun "
        "with --resume"
    ) from damaged


# ---- what a call shows when the application has not configured logging -----------------------
class _StderrLines(logging.Handler):
    """Each record's message, one line on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(record.getMessage(), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


_SHOWN_LOCK = threading.Lock()
_SHOWN_HANDLER = _StderrLines()
_shown_levels: list[int] = []  # one entry per call that installed the handler, still running
_shown_saved: list = []  # the logger's (level, propagate) before the first of those calls


@contextlib.contextmanager
def _shown_on_stderr(notes: bool):
    """Within the block, the records of the ``emdiffuse`` loggers are shown on stderr — notes
    (the plan, "already complete", the dashboard link) when ``notes``, warnings always —
    unless the application configured the ``emdiffuse`` logger (a level or a handler of its
    own, as the CLI and the notebooks do): its choice stands. What lastResort did for
    warnings before the package's NullHandler, and what ``print`` did for the notes."""
    logger = logging.getLogger("emdiffuse")
    level = logging.INFO if notes else logging.WARNING
    with _SHOWN_LOCK:
        ours = bool(_shown_levels)
        own = [h for h in logger.handlers if h is not _SHOWN_HANDLER]
        configured = not ours and (
            logger.level != logging.NOTSET
            or any(not isinstance(h, logging.NullHandler) for h in own)
        )
        if not configured:
            if not ours:
                _shown_saved[:] = [logger.level, logger.propagate]
                logger.addHandler(_SHOWN_HANDLER)
                logger.propagate = False  # shown here, once
            _shown_levels.append(level)
            _SHOWN_HANDLER.setLevel(min(_shown_levels))
            logger.setLevel(min(_shown_levels))
    try:
        yield
    finally:
        if not configured:
            with _SHOWN_LOCK:
                _shown_levels.remove(level)
                if _shown_levels:
                    _SHOWN_HANDLER.setLevel(min(_shown_levels))
                    logger.setLevel(min(_shown_levels))
                else:
                    logger.removeHandler(_SHOWN_HANDLER)
                    logger.setLevel(_shown_saved[0])
                    logger.propagate = _shown_saved[1]
