"""Graph build and scheduling cost for 10³–10⁵ output chunks.

    python benchmarks/graph_scaling.py [--build 1000,10000,100000] [--run 1000,10000]
        [--workers 2] [--map-overlap-max 10000]

Two parts.

1. **Build** (virtual volume, no data): the run's real :class:`RunSpec` and lattice for a
   volume of ``N`` output chunks of the default shape (4, 512, 512) with the default tiles
   (256, overlap 64) — volume (4N/100, 5120, 5120) — then ``build_graph``: seconds, tasks,
   dependencies, pickled size (what the client ships to the scheduler) and ``dask.order``
   (what the scheduler runs on every graph it receives). For comparison, the graph that
   ``dask.array.map_overlap`` materialises for the same chunks and overlap (the route the
   design avoids) up to ``--map-overlap-max`` chunks.
2. **Run** (real tasks): a real uint8 OME-Zarr input of ``N`` chunks of (1, 32, 32) voxels
   (volume (N/100, 320, 320)), a real checkpoint of a *micro* UNet (4 channels, three levels so the middle attention is 8x8,
   seeded random weights: the real Enhancer and sampler, 1 step, so each tile costs ~1 ms
   and what is measured is the pipeline and the scheduler, not the network), tiles 32 with
   overlap 8, on a LocalCluster of ``--workers`` processes x 1 thread. Timed: graph build,
   submission (``client.get`` returning), the first task starting, all chunks written.
   From distributed's task stream: the sum of the tasks' compute time; the scheduling
   overhead per task is ``(wall x workers - compute) / tasks`` (time a worker thread is not
   running a task: scheduler latency, transfers, (de)serialisation, idle tail). The
   client process's CPU time over the run is the scheduler's and the client's (a
   LocalCluster's scheduler runs in the client process).

Writes benchmarks/results/graph_scaling.json and graph_scaling.png.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    RESULTS,
    load_average,
    machine_info,
    make_model,
    start_cluster,
    start_record,
    stop_cluster,
    write_results,
)

from emdiffuse.models.normalization import Normalization
from emdiffuse.pipeline.graph import build_graph, is_tile_task
from emdiffuse.pipeline.lattice import Lattice, iter_chunks
from emdiffuse.pipeline.settings import RunSettings, RunSpec

DEFAULT_CHUNKS = (4, 512, 512)


def virtual_spec(n_chunks: int, *, tile: int = 256, overlap: int = 64) -> RunSpec:
    """The RunSpec of a denoising run over a virtual volume of ``n_chunks`` default chunks
    (10 x 10 chunks per plane, so ``n_chunks`` must be a multiple of 100)."""
    cz, cy, cx = DEFAULT_CHUNKS
    shape = (cz * n_chunks // 100, 10 * cy, 10 * cx)
    return RunSpec(
        settings=RunSettings(
            device="cpu", precision="auto", tile=tile, overlap=overlap, chunks=DEFAULT_CHUNKS,
            dtype="uint8", steps=8,
        ),
        input_path="(virtual)",
        input_level=0,
        input_voxel_size=(8.0, 8.0, 8.0),
        input_ndim=3,
        checkpoint="(virtual)",
        lattice=Lattice(shape, tile, overlap),
        output_path="(virtual)",
        normalization=Normalization(0.0, 255.0),
    )


def _dependencies(graph: dict) -> int:
    """Edges of the graph: task arguments that are keys of the graph (spec node excluded)."""
    keys = set(graph)
    edges = 0
    for value in graph.values():
        if isinstance(value, tuple):
            edges += sum(1 for arg in value[1:] if isinstance(arg, tuple) and arg in keys)
    return edges


def measure_build(n_chunks: int, map_overlap_max: int) -> dict:
    """Build the graph of a virtual ``n_chunks`` run; time, size and ordering."""
    import cloudpickle
    from dask.order import order

    spec = virtual_spec(n_chunks)
    shape = spec.lattice.output_shape
    t0 = time.perf_counter()
    indices = list(iter_chunks(shape, spec.chunks))
    t_indices = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph, keys = build_graph(spec, indices)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    payload = cloudpickle.dumps(graph, protocol=pickle.HIGHEST_PROTOCOL)
    t_pickle = time.perf_counter() - t0
    from dask._task_spec import convert_legacy_graph

    t0 = time.perf_counter()
    converted = convert_legacy_graph(graph)
    order(converted)
    t_order = time.perf_counter() - t0
    row = {
        "chunks": len(keys),
        "volume_shape": shape,
        "tiles": spec.lattice.n_tiles,
        "tasks": len(graph) - 1,
        "tile_tasks": sum(1 for k in graph if is_tile_task(k)),
        "dependencies": _dependencies(graph),
        "index_seconds": t_indices,
        "build_seconds": t_build,
        "build_us_per_chunk": 1e6 * t_build / len(keys),
        "pickle_seconds": t_pickle,
        "pickled_bytes": len(payload),
        "order_seconds": t_order,
    }
    if n_chunks <= map_overlap_max:
        row.update(map_overlap_graph(spec))
    return row


def map_overlap_graph(spec: RunSpec) -> dict:
    """Tasks of the graph ``dask.array.map_overlap`` makes for the same chunks and tile
    overlap (lazy input, materialised graph; nothing is computed)."""
    import dask.array as da

    shape = spec.lattice.output_shape
    depth = {0: 0, 1: spec.lattice.overlap, 2: spec.lattice.overlap}
    t0 = time.perf_counter()
    data = da.zeros(shape, chunks=spec.chunks, dtype=np.uint8)
    result = data.map_overlap(lambda x: x, depth=depth, boundary="none", dtype=np.uint8)
    graph = dict(result.__dask_graph__())
    return {
        "map_overlap_tasks": len(graph),
        "map_overlap_build_seconds": time.perf_counter() - t0,
    }


def micro_model(path: Path) -> str:
    """A real checkpoint of a micro UNet (4 channels, 3 levels, seeded random weights)."""
    unet = dict(base_channels=4, channel_mults=(1, 1, 1), num_res_blocks=1, norm_groups=4)
    return make_model(path, unet=unet)


def measure_run(n_chunks: int, client, workers: int, work: Path) -> dict:
    """Run a real ``n_chunks`` enhancement graph on ``client``; times and overheads."""
    import dask.array as da
    import psutil
    from distributed import get_task_stream, wait

    from emdiffuse.io import open_volume, write_image
    from emdiffuse.pipeline import run_record as record
    from emdiffuse.pipeline.lattice import chunk_box
    from emdiffuse.pipeline.outputs import create_outputs, finalize_outputs
    from emdiffuse.pipeline.prepare import prepare
    from emdiffuse.pipeline.settings import Source

    shape = (n_chunks // 100, 320, 320)
    chunks = (1, 32, 32)
    inp = work / f"in-{n_chunks}.ome.zarr"
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=shape, dtype=np.uint8)
    write_image(da.from_array(data, chunks=(1, 320, 320)), inp, voxel_size=(8.0, 8.0, 8.0))
    model = micro_model(work / "micro.safetensors")
    out = work / f"out-{n_chunks}.zarr"
    t0 = time.perf_counter()
    spec = prepare(
        Source(inp, model), out,
        RunSettings(steps=1, tile=32, overlap=8, chunks=chunks, sampler="ddim"),
    )  # fmt: skip
    create_outputs(spec, overwrite=False)
    record.write_run_config(out, spec.record())
    t_prepare = time.perf_counter() - t0
    indices = list(iter_chunks(spec.lattice.output_shape, spec.chunks))
    t0 = time.perf_counter()
    graph, keys = build_graph(spec, indices)
    t_build = time.perf_counter() - t0
    n_tasks = len(graph) - 1
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    with get_task_stream(client) as stream:
        wall0 = time.time()
        t0 = time.perf_counter()
        futures = client.get(graph, keys, sync=False)
        t_submit = time.perf_counter() - t0
        wait(futures)
        t_total = time.perf_counter() - t0
    cpu = sum(me.cpu_times()[:2]) - cpu0
    records = client.gather(futures)
    del futures
    compute = 0.0
    first_start = None
    computed = set()
    for task in stream.data:
        for part in task.get("startstops", ()):
            if part["action"] == "compute":
                compute += part["stop"] - part["start"]
                first_start = (
                    part["start"] if first_start is None else min(first_start, part["start"])
                )
                computed.add(task["key"])
    done = record.done_chunks(out)
    t0 = time.perf_counter()
    finalize_outputs(spec)
    t_finalize = time.perf_counter() - t0
    written = open_volume(str(out)).data
    sample = indices[len(indices) // 2]
    box = chunk_box(sample, spec.lattice.output_shape, spec.chunks)
    block = np.asarray(written[tuple(slice(a, b) for a, b in box)])
    row = {
        "chunks": len(keys),
        "volume_shape": shape,
        "chunk_shape": chunks,
        "tiles": spec.lattice.n_tiles,
        "tasks": n_tasks,
        "tasks_in_task_stream": len(computed),
        "prepare_and_create_seconds": t_prepare,
        "build_seconds": t_build,
        "submit_seconds": t_submit,
        "first_task_start_seconds": (first_start - wall0) if first_start else None,
        "total_seconds": t_total,
        "task_compute_seconds": compute,
        "overhead_ms_per_task": 1e3 * (t_total * workers - compute) / n_tasks,
        "chunks_per_second": len(keys) / t_total,
        "pyramid_and_metadata_seconds": t_finalize,
        "client_process_cpu_seconds": cpu,
        "client_cpu_ms_per_task": 1e3 * cpu / n_tasks,
        "all_chunks_marked_done": len(done) == len(keys),
        "records": len(records),
        "sample_chunk_nonzero": bool(block.any()),
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def plot(build_rows: list[dict], run_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    n = [r["chunks"] for r in build_rows]
    ax = axes[0]
    ax.loglog(n, [r["build_seconds"] for r in build_rows], "o-", label="build_graph")
    ax.loglog(n, [r["order_seconds"] for r in build_rows], "s-", label="dask.order")
    ax.loglog(n, [r["pickle_seconds"] for r in build_rows], "^-", label="pickle")
    mo = [r for r in build_rows if "map_overlap_tasks" in r]
    if mo:
        ax.loglog(
            [r["chunks"] for r in mo],
            [r["map_overlap_build_seconds"] for r in mo],
            "x--",
            label="map_overlap graph",
        )
    ax.set_xlabel("output chunks")
    ax.set_ylabel("seconds")
    ax.set_title("graph construction (virtual volume)")
    ax.legend()
    ax = axes[1]
    ax.loglog(n, [r["tasks"] for r in build_rows], "o-", label="emdiffuse tasks")
    if mo:
        ax.loglog(
            [r["chunks"] for r in mo],
            [r["map_overlap_tasks"] for r in mo],
            "x--",
            label="map_overlap",
        )
    ax.set_xlabel("output chunks")
    ax.set_ylabel("tasks")
    ax.set_title("graph size")
    ax.legend()
    ax = axes[2]
    if run_rows:
        m = [r["chunks"] for r in run_rows]
        ax.semilogx(m, [r["overhead_ms_per_task"] for r in run_rows], "o-", label="overhead/task")
        ax.semilogx(
            m,
            [r["client_cpu_ms_per_task"] for r in run_rows],
            "s-",
            label="scheduler+client CPU/task",
        )
        ax.semilogx(
            m,
            [1e3 * r["task_compute_seconds"] / r["tasks"] for r in run_rows],
            "^-",
            label="compute/task",
        )
        ax.set_xlabel("output chunks (real run)")
        ax.set_ylabel("ms per task")
        ax.set_title("LocalCluster run, micro model")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="1000,10000,100000")
    parser.add_argument("--run", default="1000,10000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--map-overlap-max", type=int, default=10000)
    args = parser.parse_args(argv)
    builds = [int(v) for v in args.build.split(",") if v]
    runs = [int(v) for v in args.run.split(",") if v]

    record = start_record(__file__, argv)
    info = machine_info(record)
    load_start = load_average()
    print(f"load average at start: {load_start}", file=sys.stderr)
    build_rows = []
    for n in builds:
        build_rows.append(measure_build(n, args.map_overlap_max))
        print(f"  built {n}", file=sys.stderr, flush=True)
    run_rows = []
    if runs:
        work = Path(tempfile.mkdtemp(prefix="emdiffuse-graph-"))
        t0 = time.perf_counter()
        cluster, client = start_cluster(args.workers)
        cluster_start = time.perf_counter() - t0
        try:
            for n in runs:
                run_rows.append(measure_run(n, client, args.workers, work))
                print(f"  ran {n}", file=sys.stderr, flush=True)
        finally:
            stop_cluster(cluster, client)
            shutil.rmtree(work, ignore_errors=True)
    else:
        cluster_start = None

    png = RESULTS / "graph_scaling.png"
    plot(build_rows, run_rows, png)
    payload = {
        "benchmark": "graph_scaling",
        "command": "python benchmarks/graph_scaling.py " + " ".join(argv or sys.argv[1:]),
        "build_settings": {"chunks": DEFAULT_CHUNKS, "tile": 256, "overlap": 64},
        "run_settings": {
            "chunks": (1, 32, 32),
            "tile": 32,
            "overlap": 8,
            "steps": 1,
            "sampler": "ddim",
            "model": "micro UNet (4 channels, 3 levels), seeded random weights",
            "workers": args.workers,
            "threads_per_worker": 1,
            "cluster_start_seconds": cluster_start,
        },
        "build": build_rows,
        "run": run_rows,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "plot": str(png.relative_to(RESULTS.parent.parent)),
        **info,
        "provenance": record,
    }
    path = write_results("graph_scaling", payload)

    print(
        f"\n{'chunks':>8}{'tasks':>9}{'deps':>9}{'build s':>9}{'us/chunk':>10}{'order s':>9}"
        f"{'MB':>7}{'map_overlap tasks':>19}"
    )
    for r in build_rows:
        mo = r.get("map_overlap_tasks", "")
        print(
            f"{r['chunks']:>8}{r['tasks']:>9}{r['dependencies']:>9}{r['build_seconds']:>9.3f}"
            f"{r['build_us_per_chunk']:>10.1f}{r['order_seconds']:>9.3f}"
            f"{r['pickled_bytes'] / 1e6:>7.1f}{mo:>19}"
        )
    if run_rows:
        print(
            f"\n{'chunks':>8}{'tasks':>8}{'submit s':>10}{'1st task s':>11}{'total s':>9}"
            f"{'compute s':>11}{'ovh ms/task':>12}{'sched cpu ms/task':>18}"
        )
        for r in run_rows:
            print(
                f"{r['chunks']:>8}{r['tasks']:>8}{r['submit_seconds']:>10.3f}"
                f"{r['first_task_start_seconds']:>11.2f}{r['total_seconds']:>9.1f}"
                f"{r['task_compute_seconds']:>11.1f}{r['overhead_ms_per_task']:>12.2f}"
                f"{r['client_cpu_ms_per_task']:>18.2f}"
            )
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
