"""The Dask graph of a run, built from block coordinates: each tile runs once.

Two kinds of task, both keyed on block coordinates of the output chunk grid:

- ``emdiffuse-tiles-<token>, z, y, x`` — :func:`~emdiffuse.pipeline.tasks.produce_block`:
  reads its own input region from the store, runs the tiles the block owns (every lattice
  tile is owned by exactly one block) and returns their weighted sums cut to the chunks
  they reach. These need the model: on a cluster with GPU workers they are annotated
  ``resources={"GPU": 1}``.
- ``emdiffuse-chunk-<token>, z, y, x`` — :func:`~emdiffuse.pipeline.tasks.run_chunk`:
  depends on its source blocks (itself and, along y and x, the blocks just before it whose
  tiles reach into it: at most 4 for 2D models, 8 when isotropic units straddle z chunks),
  blends, writes its region of the output and its done marker.

A tile that overlaps several chunks used to run once per chunk (1.4–1.8× the network
evaluations with the then-default 256/64 tiles and 512 chunks); here it runs once and its
output travels to the neighbouring chunk instead (a strip of the chunk, a few MB). The
graph is a plain dict with one spec node, about two tasks per chunk and at most a handful
of edges per task — no ``map_overlap``, no slicing graph of the input — so it builds in
microseconds per chunk and the scheduler's cost per task stays flat.
"""

from __future__ import annotations

import inspect
import os
import sys
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import dask
import dask.threaded
import torch
from dask.callbacks import Callback
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import as_completed
from distributed import progress as distributed_progress
from tqdm.auto import tqdm

from emdiffuse.pipeline.progress import LineProgress, is_terminal
from emdiffuse.pipeline.settings import RunSpec
from emdiffuse.pipeline.tasks import block_plan, produce_block, run_chunk

TASK_NAME = "emdiffuse-chunk"
GRAPH_BYTES_PER_TASK = 2048  # generous bound on one pickled task of ours
TILES_NAME = "emdiffuse-tiles"


def build_graph(
    spec: RunSpec, indices: Sequence[tuple[int, int, int]], *, token: str | None = None
) -> tuple[dict, list]:
    """``(graph, keys)``: one blend-and-write task per chunk index (``keys``, in the order
    of ``indices``) and one tile task per block those chunks need, all sharing one spec
    node."""
    token = token or uuid.uuid4().hex[:12]
    spec_key = f"emdiffuse-spec-{token}"
    tiles_name = f"{TILES_NAME}-{token}"
    name = f"{TASK_NAME}-{token}"
    plan = block_plan(spec, indices)
    graph: dict = {spec_key: spec}
    for block, targets in plan.targets.items():
        graph[(tiles_name, *block)] = (produce_block, spec_key, block, targets)
    keys = []
    for index, sources in plan.sources.items():
        key = (name, *index)
        graph[key] = (run_chunk, spec_key, index, *[(tiles_name, *b) for b in sources])
        keys.append(key)
    return graph, keys


def is_tile_task(key) -> bool:
    """Whether ``key`` is a tile task (the tasks that run the model)."""
    return isinstance(key, tuple) and str(key[0]).startswith(TILES_NAME)


def cluster_has_gpus(client) -> bool:
    """Whether any worker of ``client``'s cluster advertises a ``GPU`` resource."""
    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    return any(w.get("resources", {}).get("GPU") for w in info.get("workers", {}).values())


def _accepts_n_workers(client) -> bool:
    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def gpu_annotated(graph: dict):
    """``graph`` as a HighLevelGraph whose tile tasks ask for ``resources={"GPU": 1}``
    (blending and writing may run on any worker)."""
    spec = {k: v for k, v in graph.items() if not isinstance(k, tuple)}
    tiles = {k: v for k, v in graph.items() if is_tile_task(k)}
    chunks = {k: v for k, v in graph.items() if isinstance(k, tuple) and not is_tile_task(k)}
    layers = {
        "emdiffuse-spec": MaterializedLayer(spec),
        "emdiffuse-tiles": MaterializedLayer(tiles, annotations={"resources": {"GPU": 1}}),
        "emdiffuse-chunks": MaterializedLayer(chunks),
    }
    dependencies = {
        "emdiffuse-spec": set(),
        "emdiffuse-tiles": {"emdiffuse-spec"},
        "emdiffuse-chunks": {"emdiffuse-spec", "emdiffuse-tiles"},
    }
    return HighLevelGraph(layers, dependencies)


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads to ``n`` for the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_graph(
    graph: dict,
    keys: list,
    *,
    client=None,
    num_workers: int | None = None,
    progress: bool = True,
    voxels: int | None = None,
) -> list[dict]:
    """Execute the graph; return the per-chunk records in the order of ``keys``.

    With ``client``: submitted to its cluster (tile tasks GPU-annotated when it has GPU
    workers), with a distributed progress bar. Without: Dask's threaded scheduler with
    ``num_workers`` threads, each giving torch ``cores // num_workers`` threads (no
    oversubscription), and a progress bar over chunks. When stderr is not a terminal (a batch
    log) the bars are replaced by a plain line every few percent or minute
    (:class:`~emdiffuse.pipeline.progress.LineProgress`; ``voxels``: the output voxels of the
    chunks in ``keys``, for the Mvoxel/s figure).
    """
    lines = progress and not is_terminal(sys.stderr)
    if not keys:
        return []
    if client is not None:
        submitted = gpu_annotated(graph) if cluster_has_gpus(client) else graph
        # The graph holds no array data, only ~0.5 KB of task description per task: at 10^4
        # chunks that passes distributed's 10 MB "large graph" warning, which is about data
        # embedded in graphs. Warn only above what our tasks can account for.
        threshold = max(10_000_000, GRAPH_BYTES_PER_TASK * len(graph))
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": threshold}):
            futures = client.get(submitted, keys, sync=False)
        try:
            if lines:
                reporter = LineProgress(len(futures), voxels)
                for _ in as_completed(futures):
                    reporter.update()
            elif progress:
                distributed_progress(futures, notebook=False)
                print(file=sys.stderr)
            return client.gather(futures)
        except BaseException:
            client.cancel(futures)  # a crash or Ctrl-C stops the run; finished chunks are kept
            raise
    workers = max(1, num_workers or cpu_count())
    # Our own pool, shut down with wait=True however the run ends: after a failure or Ctrl-C
    # no task is still writing when enhance() returns (dask alone leaves them running).
    pool = ThreadPoolExecutor(workers)
    try:
        with torch_threads(max(1, cpu_count() // workers)):
            if not progress:
                return list(dask.threaded.get(graph, keys, pool=pool))
            with _ChunkBar(len(keys), LineProgress(len(keys), voxels) if lines else None):
                return list(dask.threaded.get(graph, keys, pool=pool))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ChunkBar:
    """A tqdm bar over the chunk tasks of a threaded run (tile tasks are not counted), or
    ``lines`` (a :class:`LineProgress`) in its place."""

    def __init__(self, total: int, lines: LineProgress | None = None):
        self.bar = tqdm(total=total, desc="chunks", unit="chunk") if lines is None else None
        bar = self.bar if lines is None else lines

        class _Callback(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if isinstance(key, tuple) and str(key[0]).startswith(TASK_NAME):
                    bar.update()

        self.callback = _Callback()

    def __enter__(self):
        self.callback.__enter__()
        return self

    def __exit__(self, *exc):
        self.callback.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()
