"""The Dask graph of a run, built from block coordinates: one task per output chunk.

The graph is a plain dict — one data node holding the :class:`RunSpec` and one
``run_chunk(spec, index)`` task per chunk — so it costs a few microseconds per chunk to build
and the scheduler sees exactly one task per chunk with no dependencies between them (no
``map_overlap``, no slicing graph of the input: each task reads its own region from the
store). It runs on a ``distributed.Client`` (tasks annotated ``resources={"GPU": 1}`` when
the cluster has GPU workers) or on Dask's threaded scheduler.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence

from emdiffuse.pipeline.workers import RunSpec, run_chunk

TASK_NAME = "emdiffuse-chunk"


def build_graph(
    spec: RunSpec, indices: Sequence[tuple[int, int, int]], *, token: str | None = None
) -> tuple[dict, list]:
    """``(graph, keys)``: one task per chunk index, all sharing one spec node."""
    token = token or uuid.uuid4().hex[:12]
    spec_key = f"emdiffuse-spec-{token}"
    name = f"{TASK_NAME}-{token}"
    graph: dict = {spec_key: spec}
    keys = []
    for index in indices:
        key = (name, *map(int, index))
        graph[key] = (run_chunk, spec_key, tuple(int(i) for i in index))
        keys.append(key)
    return graph, keys


def cluster_has_gpus(client) -> bool:
    """Whether any worker of ``client``'s cluster advertises a ``GPU`` resource."""
    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    return any(w.get("resources", {}).get("GPU") for w in info.get("workers", {}).values())


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def run_graph(
    graph: dict,
    keys: list,
    *,
    client=None,
    num_workers: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Execute the graph; return the per-chunk records in the order of ``keys``.

    With ``client``: submitted to its cluster (GPU-annotated when it has GPU workers), with a
    distributed progress bar. Without: Dask's threaded scheduler with a tqdm bar.
    """
    if not keys:
        return []
    if client is not None:
        resources = {"GPU": 1} if cluster_has_gpus(client) else None
        futures = client.get(graph, keys, sync=False, resources=resources)
        try:
            if progress:
                from distributed import progress as distributed_progress

                distributed_progress(futures, notebook=False)
                print(file=sys.stderr)
            return client.gather(futures)
        except BaseException:
            client.cancel(futures)  # a crash or Ctrl-C stops the run; finished chunks are kept
            raise
    import dask.threaded

    if progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="chunks", unit="chunk", total=len(keys)):
            return list(dask.threaded.get(graph, keys, num_workers=num_workers))
    return list(dask.threaded.get(graph, keys, num_workers=num_workers))
