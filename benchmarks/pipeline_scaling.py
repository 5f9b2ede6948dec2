"""Pipeline scaling: time and peak memory per worker for volumes of 1x, 4x and 16x voxels.

    python benchmarks/pipeline_scaling.py [--base 2,384,384] [--factors 1,4,16] [--tile 128]
        [--overlap 32] [--chunks 2,256,256] [--steps 8] [--workers 2]

Goal (issue 4): time proportional to voxels, worker memory flat (bounded memory: a worker's
peak depends on chunk and tile size, never on the volume).

The volumes grow in y and x (``factor`` 4 = twice the side), the direction in which a
chunked pipeline could hold more in flight (a row of chunks is wider); chunk, tile, model
and settings stay the same. Model: the ``tiny`` emdiffuse-n preset with seeded random weights
(timing and memory do not depend on the weights). Input: uint8 synthetic EM with noise.

Each volume runs in a fresh child process with a fresh LocalCluster (``--workers`` processes x
1 thread), so every peak is that run's own:

* **worker peak RSS**: each worker process's ``VmHWM`` (the kernel's high-water mark of
  resident memory, exact, no sampling) read at the end of the run; also its RSS when idle
  after the model is loaded, and the peak of distributed's managed memory (task results
  held on the worker, sampled every 0.2 s from the scheduler);
* **client peak RSS**: the child's own ``VmHWM`` (client, and the LocalCluster's scheduler,
  which runs in the client process), from before the cluster starts to the end;
* **time**: ``enhance()`` on the started cluster whose workers already hold the model and
  have run one batch of tiles (cluster start, model load and torch's first-call warm-up are
  one-off and reported apart), including the output's creation, all tasks, writes, the
  pyramid and the metadata.

Writes benchmarks/results/pipeline_scaling.json and pipeline_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    RESULTS,
    add_run_arguments,
    load_average,
    machine_info,
    make_input,
    make_model,
    run_options,
    start_cluster,
    start_record,
    stop_cluster,
    write_results,
)


def vm_hwm_bytes() -> int:
    """This process's peak resident memory (``VmHWM``), bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _warm(checkpoint: str, tile: int, batch: int) -> int:
    """On a worker: load the model and run one batch of tiles through it (torch's first
    calls at a new shape are slow: one-off start-up); return the RSS after."""
    import numpy as np

    import emdiffuse.pipeline.graph  # noqa: F401 - the task modules' imports
    from emdiffuse.pipeline.runtime import get_enhancer

    enhancer = get_enhancer(checkpoint, "auto")
    cond = np.zeros((batch, enhancer.in_slices, tile, tile), np.float32)
    enhancer.enhance(cond, np.zeros_like(cond), steps=1)
    return _rss_bytes()


def child(args) -> int:
    """One volume, one fresh cluster; prints a JSON line."""
    from emdiffuse.pipeline.enhance import enhance
    from emdiffuse.pipeline.plan import make_plan

    run = json.loads(args.run)
    t0 = time.perf_counter()
    cluster, client = start_cluster(args.workers)
    t_cluster = time.perf_counter() - t0
    peaks: dict = {}
    stop = threading.Event()

    def sample_managed():
        while not stop.is_set():
            try:
                info = client.scheduler_info(n_workers=-1)
            except TypeError:
                info = client.scheduler_info()
            except Exception:  # noqa: BLE001 - the cluster is closing
                break
            for addr, worker in info.get("workers", {}).items():
                managed = worker.get("metrics", {}).get("managed_bytes", 0)
                peaks[addr] = max(peaks.get(addr, 0), managed)
            stop.wait(0.2)

    try:
        t0 = time.perf_counter()
        idle = client.run(_warm, args.model, run["tile"], run["batch_size"])
        t_load = time.perf_counter() - t0
        sampler = threading.Thread(target=sample_managed, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        out = enhance(args.input, args.model, args.output, client=client, progress=False, **run)
        t_run = time.perf_counter() - t0
        stop.set()
        sampler.join()
        worker_hwm = client.run(vm_hwm_bytes)
        from emdiffuse.pipeline.prepare import prepare
        from emdiffuse.pipeline.settings import RunSettings, Source

        spec = prepare(
            Source(args.input, args.model), "unused.zarr", RunSettings(**run), check_output=False
        )
        plan = make_plan(
            spec.lattice, spec.chunks, steps=run["steps"], samples=1, sampler=run["sampler"]
        )
        result = {
            "shape": list(out.shape),
            "voxels": int(out.size),
            "chunks": plan.n_chunks,
            "tiles": plan.n_tiles,
            "cluster_start_seconds": t_cluster,
            "model_load_seconds": t_load,
            "seconds": t_run,
            "worker_idle_rss_bytes": sorted(idle.values()),
            "worker_peak_rss_bytes": sorted(worker_hwm.values()),
            "worker_peak_managed_bytes": sorted(peaks.values()),
            "client_peak_rss_bytes": vm_hwm_bytes(),
        }
    finally:
        stop.set()
        stop_cluster(cluster, client)
    print("RESULT " + json.dumps(result))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mv = [r["voxels"] / 1e6 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(mv, [r["seconds"] for r in rows], "o-", label="enhance (warm cluster)")
    per = rows[0]["seconds"] / mv[0]
    ax.plot(mv, [per * m for m in mv], "k:", label="proportional to voxels (from 1x)")
    ax.set_xlabel("output voxels (millions)")
    ax.set_ylabel("seconds")
    ax.set_title("time")
    ax.legend()
    ax = axes[1]
    gib = 2**20
    n_workers = len(rows[0]["worker_peak_rss_bytes"])
    for w in range(n_workers):
        ax.plot(
            mv,
            [r["worker_peak_rss_bytes"][w] / gib for r in rows],
            "o-",
            label=f"worker {w} peak RSS",
        )
    ax.plot(mv, [r["client_peak_rss_bytes"] / gib for r in rows], "s--", label="client peak RSS")
    ax.plot(
        mv,
        [max(r["worker_peak_managed_bytes"] or [0]) / gib for r in rows],
        "^:",
        label="worker peak held results",
    )
    ax.set_xlabel("output voxels (millions)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("peak memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="2,384,384")
    parser.add_argument("--factors", default="1,4,16")
    add_run_arguments(parser, chunks="2,256,256")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    record = start_record(__file__, argv)
    base = tuple(int(v) for v in args.base.split(","))
    factors = [int(v) for v in args.factors.split(",")]
    run = run_options(args)
    info = machine_info(record)
    load_start = load_average()
    print(f"load average at start: {load_start}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="emdiffuse-scaling-"))
    rows = []
    try:
        model = make_model(work / "tiny.safetensors")
        for factor in factors:
            side = int(round(factor**0.5))
            if side * side != factor:
                raise SystemExit(f"factor {factor} is not a square (the volume grows in y and x)")
            shape = (base[0], base[1] * side, base[2] * side)
            inp = make_input(work / f"in-{factor}.ome.zarr", shape)
            command = [
                sys.executable,
                __file__,
                "--child",
                "--input",
                inp,
                "--model",
                model,
                "--output",
                str(work / f"out-{factor}.zarr"),
                "--run",
                json.dumps(run),
                "--workers",
                str(args.workers),
            ]
            load = load_average()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not lines:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"child for factor {factor} failed")
            row = {"factor": factor, "load_before": load, **json.loads(lines[-1][7:])}
            row["seconds_per_mvoxel"] = row["seconds"] / (row["voxels"] / 1e6)
            rows.append(row)
            shutil.rmtree(work / f"out-{factor}.zarr", ignore_errors=True)
            shutil.rmtree(inp, ignore_errors=True)
            print(f"  factor {factor}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_row = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / base_row["seconds"]
        row["voxel_ratio"] = row["voxels"] / base_row["voxels"]
        row["tile_ratio"] = row["tiles"] / base_row["tiles"]
        row["worker_peak_ratio"] = max(row["worker_peak_rss_bytes"]) / max(
            base_row["worker_peak_rss_bytes"]
        )
    png = RESULTS / "pipeline_scaling.png"
    plot(rows, png)
    payload = {
        "benchmark": "pipeline_scaling",
        "command": "python benchmarks/pipeline_scaling.py " + " ".join(argv or sys.argv[1:]),
        "model": "emdiffuse-n tiny preset, seeded random weights (timing and memory only)",
        "settings": {
            "base_shape": base,
            "factors": factors,
            "dtype": "uint8",
            "workers": args.workers,
            "threads_per_worker": 1,
            **run,
        },
        "rows": rows,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "plot": str(png.relative_to(RESULTS.parent.parent)),
        **info,
        "provenance": record,
    }
    path = write_results("pipeline_scaling", payload)
    mib = 2**20
    print(
        f"\n{'factor':>6}{'shape':>16}{'tiles':>7}{'seconds':>9}{'t ratio':>8}{'s/Mvox':>8}"
        f"{'worker peak MiB':>18}{'held MiB':>10}{'client MiB':>11}"
    )
    for r in rows:
        peaks = "/".join(f"{b / mib:.0f}" for b in r["worker_peak_rss_bytes"])
        held = max(r["worker_peak_managed_bytes"] or [0]) / mib
        print(
            f"{r['factor']:>6}{'x'.join(map(str, r['shape'])):>16}{r['tiles']:>7}"
            f"{r['seconds']:>9.1f}{r['time_ratio']:>8.2f}{r['seconds_per_mvoxel']:>8.1f}"
            f"{peaks:>18}{held:>10.1f}{r['client_peak_rss_bytes'] / mib:>11.0f}"
        )
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
