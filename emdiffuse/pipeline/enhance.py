"""``enhance``: a model and a volume of any size -> an enhanced multiscale OME-Zarr.

Steps: open the input (read-only) and the model; check that they fit; refuse an existing
output unless overwrite/resume; fix the intensity normalisation once; lay the global tile
lattice and the output chunks; report the plan; create the output (and the uncertainty
image when ``samples >= 2``) and store the run config; run one task per unfinished output
chunk (each reads its input region, runs its tiles, blends, writes its region and a
finished-chunk marker); build the pyramid and write the metadata last.

Output grid and voxel size per task (input voxel size ``(vz, vy, vx)`` nm):

- denoise: same grid, same voxel size.
- super-resolution ×k: ``(nz, k*ny, k*nx)``, voxel ``(vz, vy/k, vx/k)``; the translation
  moves by ``-(k-1)/(2k)`` input voxels in y and x so output voxel centres tile the input
  voxels.
- isotropic ×k: ``((nz-1)*k + 1, ny, nx)``, voxel ``(vz/k, vy, vx)``; input slice i is
  output slice ``i*k`` unchanged; the ``k - 1`` slices between come from the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.normalization import from_model, sample_percentiles
from emdiffuse.models.sampler_names import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLER_NAMES,
    network_evaluations,
    resolve_spacing,
)
from emdiffuse.pipeline import run_record as record
from emdiffuse.pipeline.graph import build_graph, run_graph
from emdiffuse.pipeline.lattice import Lattice, iter_chunks
from emdiffuse.pipeline.plan import Plan, make_plan
from emdiffuse.pipeline.preflight import (
    CONNECT_TIMEOUT,
    check_device,
    check_seed,
    check_tile_memory,
    check_worker_devices,
    connect,
    device_problem,
    warn_if_far_from_training_range,
)
from emdiffuse.pipeline.workers import RunSpec, get_enhancer

SAMPLERS = SAMPLER_NAMES  # the samplers' own list (emdiffuse.models.sampler_names)
DEFAULT_TILE_MAX = 256
DEFAULT_CHUNK_YX = 512


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def choose_tile(
    output_yx: tuple[int, int], multiple: int, xy_scale: int, tile: int | None, overlap: int | None
) -> tuple[int, int]:
    """Tile and overlap on the output grid (validated, defaults filled in).

    Default tile: the smallest multiple of ``multiple`` covering the larger yx side, at most
    256 (rounded up to ``multiple``); default overlap: a quarter of the tile, rounded down to
    a multiple of ``xy_scale``. A larger tile is capped to that covering side (the padded
    image: one tile per axis), and an overlap that no longer fits falls back to the default.
    """
    step = math.lcm(multiple, xy_scale)
    whole = _round_up(max(output_yx), step)  # one tile covers the (padded) image
    if tile is None:
        tile = min(whole, _round_up(DEFAULT_TILE_MAX, step))
    tile = _check_positive_int("tile", tile)
    if tile > whole:
        tile = whole
        if overlap is not None and not isinstance(overlap, bool) and overlap >= tile:
            overlap = None
    if tile % step:
        raise InputError(
            f"tile {tile} must be a multiple of {step} for this model (output-grid voxels); "
            f"try --tile {_round_up(tile, step)}"
        )
    if overlap is None:
        overlap = (tile // 4) // xy_scale * xy_scale
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise InputError(f"overlap must be an integer, got {overlap!r}")
    overlap = int(overlap)
    if not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must be >= 0 and smaller than the tile ({tile})")
    if overlap % xy_scale:
        raise InputError(
            f"overlap {overlap} must be a multiple of the super-resolution factor {xy_scale}"
        )
    return tile, overlap


def default_chunks(output_shape: tuple[int, int, int], z_scale: int) -> tuple[int, int, int]:
    """Output chunks: 2 input intervals (isotropic) or 4 slices along z, 512 in y and x."""
    nz, ny, nx = output_shape
    cz = 2 * z_scale if z_scale > 1 else 4
    return min(nz, cz), min(ny, DEFAULT_CHUNK_YX), min(nx, DEFAULT_CHUNK_YX)


def _parse_chunks(chunks, output_shape, z_scale, ndim) -> tuple[int, int, int]:
    if chunks is None:
        result = default_chunks(output_shape, z_scale)
    else:
        if isinstance(chunks, (int, np.integer)):
            chunks = (chunks,) * ndim
        chunks = tuple(chunks)
        if len(chunks) != ndim:
            raise InputError(
                f"chunks {chunks} must have one size per axis ({ndim}: "
                f"{'zyx' if ndim == 3 else 'yx'})"
            )
        for c in chunks:
            _check_positive_int("each chunk size", c)
        result = (1, *chunks) if ndim == 2 else chunks
        result = tuple(min(int(c), s) for c, s in zip(result, output_shape, strict=True))
    if ndim == 2:
        result = (1, *result[1:])
    return tuple(int(c) for c in result)


def _output_geometry(volume, config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Output voxel size and translation (zyx nm, or yx for 2D)."""
    vs = tuple(float(v) for v in volume.voxel_size)
    tr = tuple(float(t) for t in (volume.translation or (0.0,) * len(vs)))
    k_xy, k_z = config.xy_scale, config.z_scale
    if volume.ndim == 2:
        vs, tr = (1.0, *vs), (0.0, *tr)
    out_vs = (vs[0] / k_z, vs[1] / k_xy, vs[2] / k_xy)
    shift = [0.0, -vs[1] * (k_xy - 1) / (2 * k_xy), -vs[2] * (k_xy - 1) / (2 * k_xy)]
    out_tr = tuple(t + s for t, s in zip(tr, shift, strict=True))
    if volume.ndim == 2:
        return out_vs[1:], out_tr[1:]
    return out_vs, out_tr


def _check_model_fits(volume, config, *, voxel_tolerance: float = 0.5) -> None:
    """Refuse a model whose task does not fit the input."""
    if config.dims != 2:
        raise InputError(
            f"{config.describe()} is a 3D network; enhance runs 2D networks slice by slice; "
            "use a 2D checkpoint"
        )
    if config.isotropic:
        if volume.ndim != 3:
            raise InputError(
                f"{config.describe()} reconstructs z-slices but the input is 2D (yx); "
                "give a 3D (zyx) volume or a denoise/super-resolve checkpoint"
            )
        if volume.shape[0] < 2:
            raise InputError(
                f"{config.describe()} needs at least 2 z-slices, the input has "
                f"{volume.shape[0]}; give a 3D volume"
            )
        vz, vy, vx = volume.voxel_size
        ratio = float(vz) / float(min(vy, vx))
        if abs(ratio / config.z_scale - 1.0) > voxel_tolerance:
            raise InputError(
                f"the input's z step is {ratio:.3g}x its xy voxel size but {config.describe()} "
                f"fills in {config.z_scale}x; check --voxel-size or use a model for this factor"
            )


def _run_config(
    *,
    volume,
    level,
    model_hash,
    config,
    steps,
    samples,
    seed,
    tile,
    overlap,
    sampler,
    spacing,
    chunks,
    norm,
    dtype,
    output_shape,
) -> dict:
    return {
        "input": os.path.abspath(volume.path)
        if "://" not in str(volume.path)
        else str(volume.path),
        "input_level": int(level),
        "input_shape": list(map(int, volume.shape)),
        "model_sha256": model_hash,
        "variant": config.variant,
        "scale_factor": int(config.scale_factor),
        "steps": int(steps),
        "samples": int(samples),
        "seed": int(seed),
        "tile": int(tile),
        "overlap": int(overlap),
        "sampler": sampler,
        "spacing": spacing,
        "chunks": list(map(int, chunks)),
        "normalization": norm.to_dict(),
        "dtype": str(np.dtype(dtype)),
        "output_shape": list(map(int, output_shape)),
    }


def measure_seconds_per_tile(
    enhancer, lattice: Lattice, *, steps: int, sampler: str, spacing: str | None = None
) -> float:
    """Estimated seconds of one tile (all steps, one sample) on this process's enhancer:
    one sampler step (one network evaluation; one per in-between slice for index-embedding
    models) is timed and multiplied by the sampler's evaluations, so a dry run stays cheap
    whatever ``steps`` is. A step on the smallest tile first takes the one-time costs (device
    context, thread pools) out of the timing. ``spacing`` does not change the cost."""

    def one_step(side: int) -> float:
        t = side // lattice.xy_scale
        cond = np.zeros((1, enhancer.in_slices, t, t), np.float32)
        noise = np.zeros((1, enhancer.out_slices, side, side), np.float32)
        start = time.perf_counter()
        enhancer.enhance(cond, noise, sampler="ddim", steps=1)  # deterministic: one evaluation
        return time.perf_counter() - start

    one_step(enhancer.multiple)
    return one_step(lattice.tile) * network_evaluations(sampler, steps)


def prepare(
    input,
    model,
    output,
    *,
    steps: int = DEFAULT_STEPS,
    samples: int = 1,
    seed: int = 0,
    tile: int | None = None,
    overlap: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    spacing: str | None = None,
    chunks=None,
    normalize: str = "model",
    dtype=None,
    voxel_size=None,
    level: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 4,
    resume: bool = False,
    overwrite: bool = False,
    check_output: bool = True,
    task: str | None = None,
    scale_factor: int | None = None,
    local: bool = True,
) -> tuple[RunSpec, dict, object]:
    """Validate everything and build the run's :class:`RunSpec` (nothing is written).

    Returns ``(spec, run_config, volume)``. ``task`` / ``scale_factor`` (when given) refuse a
    checkpoint made for another task or factor. ``local``: the run computes on this machine,
    so its device and the memory of a tile batch are checked here (a remote cluster's
    workers are checked once connected). With ``normalize="model"``, an input whose sampled
    intensities lie far from the model's training range logs one warning.
    """
    from emdiffuse.io import check_finite, open_volume, refuse_output
    from emdiffuse.models.checkpoints import check_expected, read_checkpoint

    steps = _check_positive_int("steps", steps)
    samples = _check_positive_int("samples", samples)
    batch_size = _check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    spacing = resolve_spacing(sampler, spacing)  # refuses an unknown sampler or spacing
    if normalize not in ("model", "auto"):
        raise InputError(f"normalize must be 'model' or 'auto', got {normalize!r}")
    if not (device in ("auto", "cpu") or str(device).startswith("cuda")):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if local:
        check_device(device)

    volume = open_volume(str(input), level=level, voxel_size=voxel_size)
    if volume.ndim not in (2, 3):
        raise InputError(f"input has {volume.ndim} axes; enhance takes zyx or yx volumes")
    if dtype is None:
        dtype = volume.dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise InputError(f"unknown dtype {dtype!r}; use e.g. uint8, uint16 or float32") from None
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(f"output dtype {dtype} is not an integer or float type")

    model = str(model)
    # one read: the config checked here and the hash recorded are of the same bytes
    config, _, model_sha256 = read_checkpoint(model)
    check_expected(config, expect_task=task, expect_scale_factor=scale_factor)
    _check_model_fits(volume, config)
    if check_output:
        refuse_output(
            str(output), str(input), overwrite=overwrite, resume=resume, reads=[("model", model)]
        )
    check_finite(volume)

    in_shape = tuple(volume.shape) if volume.ndim == 3 else (1, *volume.shape)
    k_xy = config.xy_scale
    multiple = math.lcm(2 ** (len(config.unet.channel_mults) - 1), k_xy)
    out_yx = (in_shape[1] * k_xy, in_shape[2] * k_xy)
    tile, overlap = choose_tile(out_yx, multiple, k_xy, tile, overlap)
    lattice = Lattice(in_shape, tile, overlap, xy_scale=k_xy, z_scale=config.z_scale)
    out_chunks = _parse_chunks(chunks, lattice.output_shape, config.z_scale, volume.ndim)
    if local:
        check_tile_memory(config.unet, tile, min(batch_size, lattice.n_tiles), device)

    norm = (
        from_model(config) if normalize == "model" else sample_percentiles(volume.data, seed=seed)
    )
    spec = RunSpec(
        input_path=str(volume.path),
        input_level=int(level),
        input_voxel_size=tuple(float(v) for v in volume.voxel_size),
        input_ndim=volume.ndim,
        checkpoint=os.path.abspath(model),
        checkpoint_sha256=model_sha256,
        device=device,
        precision=precision,
        lattice=lattice,
        chunks=out_chunks,
        output_path=str(output),
        normalization=norm,
        dtype=str(dtype),
        seed=int(seed),
        steps=steps,
        samples=samples,
        sampler=sampler,
        spacing=spacing,
        batch_size=batch_size,
    )
    run_config = _run_config(
        volume=volume,
        level=level,
        model_hash=spec.checkpoint_sha256,
        config=config,
        steps=steps,
        samples=samples,
        seed=seed,
        tile=tile,
        overlap=overlap,
        sampler=sampler,
        spacing=spacing,
        chunks=out_chunks,
        norm=norm,
        dtype=dtype,
        output_shape=lattice.output_shape,
    )
    if normalize == "model":  # last: a warning, never followed by a refusal
        warn_if_far_from_training_range(volume.data, norm, seed=seed)
    return spec, run_config, volume


def _create_outputs(
    spec: RunSpec, volume, config_voxel: tuple, config_translation: tuple, overwrite: bool
):
    from emdiffuse.io import create_image

    axes = "zyx" if spec.input_ndim == 3 else "yx"
    shape = spec.lattice.output_shape if spec.input_ndim == 3 else spec.lattice.output_shape[1:]
    chunks = spec.chunks if spec.input_ndim == 3 else spec.chunks[1:]
    create_image(  # with overwrite: removes the earlier image, run record included
        spec.output_path,
        shape=shape,
        dtype=spec.dtype,
        chunks=chunks,
        voxel_size=config_voxel,
        axes=axes,
        translation=config_translation,
        overwrite=overwrite,
    )
    if spec.samples > 1:
        create_image(
            spec.uncertainty_path,
            shape=shape,
            dtype="float32",
            chunks=chunks,
            voxel_size=config_voxel,
            axes=axes,
            translation=config_translation,
            overwrite=True,
            name="uncertainty",
        )


def _finalize(spec: RunSpec, voxel: tuple, translation: tuple) -> None:
    from emdiffuse.io import finalize_image

    axes = "zyx" if spec.input_ndim == 3 else "yx"
    finalize_image(spec.output_path, voxel_size=voxel, axes=axes, translation=translation)
    if spec.samples > 1:
        finalize_image(spec.uncertainty_path, voxel_size=voxel, axes=axes, translation=translation)


def _make_client(
    workers: int | None,
    threads_per_worker: int | None,
    address: str | None,
    connect_timeout: float = CONNECT_TIMEOUT,
):
    """A Client: to ``address`` (InputError when it cannot be reached within
    ``connect_timeout`` s), or a LocalCluster (one worker per GPU with GPU=1, else
    ``workers`` CPU worker processes). Returns ``(client, owned)``."""
    from distributed import Client, LocalCluster

    if address:
        return connect(address, connect_timeout), True
    import torch

    if torch.cuda.is_available():
        kwargs = dict(n_workers=workers or torch.cuda.device_count(), resources={"GPU": 1})
    else:
        kwargs = dict(n_workers=workers or 2)
    with _stop_signals_ignored_by_children(), warnings.catch_warnings():
        # When 8787 is taken the dashboard moves to a free port; the printed link says where.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
        cluster = LocalCluster(threads_per_worker=threads_per_worker or 1, processes=True, **kwargs)
    return Client(cluster), True


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


def _drop_all_exit_logs() -> None:
    """Keep asyncio from logging, as "Task exception was never retrieved" with a traceback,
    the ``AllExit`` that distributed uses internally when a gather is abandoned (Ctrl-C)."""
    import logging

    asyncio_log = logging.getLogger("asyncio")
    if _drop_all_exit not in asyncio_log.filters:
        asyncio_log.addFilter(_drop_all_exit)


def _silence_distributed(level: int | None = None) -> int:
    """Set the ``distributed`` log level (default ERROR); return the previous one."""
    import logging

    logger = logging.getLogger("distributed")
    previous = logger.level
    logger.setLevel(logging.ERROR if level is None else level)
    return previous


def _quiet_shutdown(client, *, workers_too: bool) -> int:
    """After Ctrl-C the run stops on purpose: hide the shutdown chatter (cancelled tasks,
    workers killed while computing) so the user sees one line. ``workers_too``: on the
    workers as well (only for a cluster this run started). Returns this process's previous
    ``distributed`` log level, to restore after closing."""
    previous = _silence_distributed()
    if workers_too:
        with contextlib.suppress(Exception):
            client.run(_silence_distributed)
    return previous


def enhance(
    input,
    model,
    output,
    *,
    steps: int = DEFAULT_STEPS,
    samples: int = 1,
    seed: int = 0,
    tile: int | None = None,
    overlap: int | None = None,
    client=None,
    sampler: str = DEFAULT_SAMPLER,
    spacing: str | None = None,
    chunks=None,
    resume: bool = False,
    overwrite: bool = False,
    normalize: str = "model",
    dtype=None,
    progress: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    voxel_size=None,
    level: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 4,
    dry_run: bool = False,
    seconds_per_tile: float | None = None,
    chunk_hook: Callable[[tuple], None] | None = None,
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
    ``spacing`` places the sampler's steps: ``time``, ``logsnr`` or ``karras`` (None: the
    sampler's default, ``time`` for ddpm and ``logsnr`` for the others).
    ``samples >= 2`` writes the mean and, as the child image ``uncertainty``, the per-voxel
    standard deviation over samples. ``resume`` continues an interrupted run with the same
    settings (finished chunks are skipped); ``overwrite`` replaces an existing output.
    ``chunk_hook(index)`` is called at the start of every chunk task (instrumentation).
    ``task`` / ``scale_factor`` refuse a checkpoint made for another task or factor.
    Everything is checked before the output is created: options, input, model, output
    path, device, tile memory and, with ``scheduler`` an address, that the scheduler answers
    within ``connect_timeout`` seconds.
    """
    from emdiffuse.io import open_volume

    if resume and overwrite:
        raise InputError("pass either resume or overwrite, not both")
    for name, value in (
        ("workers (--workers)", workers),
        ("threads per worker (--threads-per-worker)", threads_per_worker),
    ):
        if value is not None:
            _check_positive_int(name, value)
    remote = client is not None or scheduler not in (None, "threads")
    if (
        client is None
        and remote
        and not str(scheduler).startswith(("tcp://", "tls://", "ucx://", "inproc://"))
    ):
        raise InputError(
            f"scheduler must be 'threads' or an address like tcp://host:8786, got {scheduler!r}"
        )
    output = str(output)
    exists = Path(output).exists() if "://" not in output else False
    spec, run_config, volume = prepare(
        input,
        model,
        output,
        steps=steps,
        samples=samples,
        seed=seed,
        tile=tile,
        overlap=overlap,
        sampler=sampler,
        spacing=spacing,
        chunks=chunks,
        normalize=normalize,
        dtype=dtype,
        voxel_size=voxel_size,
        level=level,
        device=device,
        precision=precision,
        batch_size=batch_size,
        resume=resume,
        overwrite=overwrite,
        check_output=not dry_run,
        task=task,
        scale_factor=scale_factor,
        local=not remote,
    )
    if chunk_hook is not None:
        spec = replace(spec, extra={**spec.extra, "chunk_hook": chunk_hook})
    voxel, translation = _output_geometry(volume, _ModelContract(spec))
    resuming = resume and exists
    done: set = set()
    if resuming:
        record.check_run_config(output, run_config)
        if record.is_complete(output):
            if progress or dry_run:
                print(f"{output}: already complete", file=sys.stderr)
            return open_volume(output).to_xarray()
        done = record.done_chunks(output)

    all_chunks = list(iter_chunks(spec.lattice.output_shape, spec.chunks))
    todo = [c for c in all_chunks if tuple(c) not in done]

    if progress or dry_run:
        if seconds_per_tile is None and todo and device_problem(device) is None:
            enhancer = get_enhancer(spec.checkpoint, device, precision, spec.checkpoint_sha256)
            seconds_per_tile = measure_seconds_per_tile(
                enhancer, spec.lattice, steps=spec.steps, sampler=spec.sampler, spacing=spec.spacing
            )
        plan = estimate_plan(
            spec,
            done=len(all_chunks) - len(todo),
            seconds_per_tile=seconds_per_tile,
            workers=_expected_workers(client, scheduler, workers),
        )
        print(plan.report(), file=sys.stderr)
        if dry_run:
            return plan

    owned = quieted = damaged = None
    if client is None and scheduler != "threads":  # connect (or start) before creating
        client, _ = _make_client(workers, threads_per_worker, scheduler, connect_timeout)
        owned = client
    try:
        if remote:
            check_worker_devices(client, device)
        if not resuming:
            _create_outputs(spec, volume, voxel, translation, overwrite=overwrite or exists)
            record.write_run_config(output, run_config)
    except BaseException:
        if owned is not None:
            _close_owned(owned)
        raise
    if owned is not None and progress:
        print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
    if client is not None:
        _drop_all_exit_logs()
    try:
        graph, keys = build_graph(spec, todo)
        run_graph(
            graph,
            keys,
            client=client,
            num_workers=(workers or 1) if scheduler == "threads" else None,
            progress=progress,
        )
    except KeyboardInterrupt:
        if client is not None:
            quieted = _quiet_shutdown(client, workers_too=owned is not None)
        raise
    except InputError as error:  # the input proved unreadable mid-run (a damaged chunk)
        damaged = error
        if client is not None:  # one line: no shutdown chatter of workers stopped mid-task
            quieted = _quiet_shutdown(client, workers_too=owned is not None)
    finally:
        if owned is not None:
            _close_owned(owned)
        if quieted is not None:
            _silence_distributed(quieted)
    if damaged is not None:
        # No task of ours still writes (threads joined, own cluster closed): an output this
        # run created goes; one that outside workers may still write to, or a resumed one, stays.
        if not resuming and "://" not in output and (client is None or owned is not None):
            shutil.rmtree(output, ignore_errors=True)
            raise damaged
        raise InputError(
            f"{damaged}; finished chunks are kept in {output}: repair the input, then rerun "
            "with --resume"
        ) from damaged

    _finalize(spec, voxel, translation)
    record.mark_complete(output)
    return open_volume(output).to_xarray()


def _close_owned(owned) -> None:
    """Close a client this run made, and its LocalCluster if it started one."""
    cluster = getattr(owned, "cluster", None)
    # Our own workers are shut down on purpose: a heartbeat racing the scheduler's
    # exit must not print a worker traceback after a finished run.
    with contextlib.suppress(Exception):
        owned.run(_silence_distributed, logging.CRITICAL)
    owned.close()
    if cluster is not None:
        cluster.close()


def _expected_workers(client, scheduler, workers) -> int:
    """How many tasks run at once (for the time estimate)."""
    if client is not None:
        return max(1, len(client.scheduler_info().get("workers", {})))
    if scheduler == "threads":
        return max(1, workers or 1)
    import torch

    return workers or (torch.cuda.device_count() if torch.cuda.is_available() else 2)


class _ModelContract:
    """The task factors of a spec, shaped like a model config for ``_output_geometry``."""

    def __init__(self, spec: RunSpec):
        self.xy_scale = spec.lattice.xy_scale
        self.z_scale = spec.lattice.z_scale


def estimate_plan(
    spec: RunSpec, *, done: int = 0, seconds_per_tile: float | None = None, workers: int = 1
) -> Plan:
    """The :class:`Plan` of a prepared run."""
    return make_plan(
        spec.lattice,
        spec.chunks,
        steps=spec.steps,
        samples=spec.samples,
        sampler=spec.sampler,
        spacing=spec.spacing or "",
        seconds_per_tile=seconds_per_tile,
        workers=workers,
        done=done,
    )
