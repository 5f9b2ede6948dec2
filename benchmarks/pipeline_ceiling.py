"""The pipeline's ceiling: output Mvoxel/s per worker with a network that costs nothing.

    python benchmarks/pipeline_ceiling.py [--shape 64,2048,2048] [--workers 1]
        [--configs default,...] [--name pipeline_ceiling] [--table-only]

Goal (issue 16): >= 50 Mvoxel/s of uint8 output per worker process, so that the pipeline
never starves one GPU (the reference-size UNet at 8 evaluations runs ~30 Mvoxel/s there).

What runs: the real pipeline — ``emdiffuse.enhance`` (the Python API's and the CLI's entry
point) from a real uint8 OME-Zarr input (synthetic noisy EM, ``--shape``, default
64×2048×2048, cached between runs under ``--cache``) into a real OME-Zarr output with its
pyramid and run record, on a real ``distributed.LocalCluster`` of ``--workers`` processes x
``--threads`` threads, ``dpmpp_2m`` at ``--steps`` 8, one sample. Only the network is
replaced, through ``enhance(enhancer_factory=...)``: a real
:class:`~emdiffuse.models.enhancer.Enhancer` (tensor conversion, sampler loop, autocast, all
as shipped) around :class:`IdentityNet`, an x0-predicting module that returns its
condition. The output therefore equals the input (checked: max abs difference over a
sample of slices); the checkpoint is a tiny seeded-random ``emdiffuse-n`` whose config
fixes the variant, intensity ranges and run record.

Each configuration (``--configs``, names of :data:`CONFIGS`: the pipeline's defaults and
the levers of issue 16 item 2) runs once on the same warm cluster (a small warm-up run
first loads torch on the workers), in this one process, so their ratios compare.

The stage split comes from the pipeline's own timers (:mod:`emdiffuse.pipeline.stages`:
per-process sums of read, normalise, gather, noise, network, blend, write and whole tasks,
collected from every worker with ``client.run``). The wall time of a run is split into
worker-seconds (wall x workers x threads): the task stages; ``in-task other`` (task time
outside the named stages); ``scheduling/other`` (worker time not inside any task: the
scheduler's round trips, transfers of the tiles' pieces between tasks, deserialising,
idle workers); ``setup`` (prepare, graph, output creation, in the client, x the worker
slots it keeps idle) and ``pyramid`` (built in the client after the last chunk, likewise).
The per-worker figure is output voxels / wall / workers. The workers' CPU seconds (user +
system, ``os.times`` in each worker) give their share of a core per second of wall time and
the Mvoxel per worker CPU second: on a shared, loaded machine the figure that the other
users' jobs disturb least.

Writes ``results/<name>.json`` (with provenance), ``<name>.md`` (table, command, what bounds
the ceiling) and ``<name>.png`` (stacked bars: seconds per output Mvoxel per worker, by stage).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS,
    load_average,
    machine_info,
    make_input,
    start_cluster,
    start_record,
    stop_cluster,
    write_results,
)

TARGET = 50.0  # Mvoxel/s of output per worker process (issue 16)
TASK_STAGES = ("read", "normalise", "gather", "noise", "network", "blend", "write")
SPLIT = (*TASK_STAGES, "in-task other", "scheduling/other", "setup", "pyramid")
# name -> enhance() options over the defaults (None: the pipeline's own choice)
CONFIGS: dict[str, dict] = {
    "default": {},
    "tasks of 1x2x2 chunks": {"chunks_per_task": (1, 2, 2)},
    "tasks of 4x2x2 chunks": {"chunks_per_task": (4, 2, 2)},
}


class IdentityNet(torch.nn.Module):
    """A network that costs nothing: returns the first ``out`` channels of its input (the
    condition), so that an x0-predicting model's every estimate is the input tile."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor, level: torch.Tensor, index=None) -> torch.Tensor:
        return x[:, : self.out]


def identity_enhancer(spec):
    """The benchmark's Enhancer (``enhance(enhancer_factory=...)``): the run's checkpoint
    config (x0 prediction) around :class:`IdentityNet`, fp32 on the CPU."""
    from emdiffuse.models.checkpoints import read_checkpoint
    from emdiffuse.models.enhancer import Enhancer

    config, _, _ = read_checkpoint(spec.checkpoint)
    return Enhancer(config, IdentityNet(config.out_slices), device="cpu", precision="fp32")


def make_identity_model(path: Path) -> str:
    """A tiny emdiffuse-n checkpoint for uint8 with x0 prediction (its weights go unused)."""
    from emdiffuse.models.checkpoints import save_checkpoint
    from emdiffuse.models.enhancer import Enhancer
    from emdiffuse.models.presets import make_config

    config = make_config(
        "emdiffuse-n", "tiny", prediction="x0", normalization={"low": 0.0, "high": 255.0}
    )
    save_checkpoint(path, Enhancer.from_config(config, seed=0).net.state_dict(), config)
    return str(path)


def cached_input(cache: Path, shape: tuple[int, int, int]) -> str:
    """The synthetic noisy uint8 input of ``shape`` (written once, kept in ``cache``)."""
    path = cache / f"ceiling-input-{'x'.join(map(str, shape))}.ome.zarr"
    if not (path / "zarr.json").exists() or not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make_input(path, shape)
        (path / ".complete").write_text("")
        print(f"wrote input {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return str(path)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    import os

    t = os.times()
    return t.user + t.system


def _gather_stages(client) -> dict[str, dict]:
    from emdiffuse.pipeline.stages import stage_seconds

    per_worker = client.run(stage_seconds)
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in per_worker.values():
        for k, v in record["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
        for k, v in record["counts"].items():
            counts[k] = counts.get(k, 0) + v
    return {"seconds": seconds, "counts": counts, "workers": len(per_worker)}


def run_config(name, options, client, inp, model, work, args) -> dict:
    """One ``enhance`` of the whole input with ``options``; its timings and stage split."""
    import emdiffuse
    from emdiffuse.pipeline.stages import reset_stages, stage_seconds

    out = work / f"out-{name}.ome.zarr"
    client.run(reset_stages)
    reset_stages()
    cpu_start = client.run(_cpu_seconds)
    client_cpu_start = _cpu_seconds()
    start = time.perf_counter()
    emdiffuse.enhance(
        inp, model, out, client=client, enhancer_factory=identity_enhancer, progress=False,
        steps=args.steps, sampler=args.sampler, samples=1, **options,
    )  # fmt: skip
    wall = time.perf_counter() - start
    cpu = {w: c - cpu_start.get(w, 0.0) for w, c in client.run(_cpu_seconds).items()}
    client_cpu = _cpu_seconds() - client_cpu_start
    workers = _gather_stages(client)
    local = stage_seconds()["seconds"]
    check = check_identity(inp, out)
    row = summarise(name, options, wall, workers, local, out, args)
    row["max_abs_diff_to_input"] = check
    row["worker_cpu_seconds"] = sum(cpu.values())
    row["client_cpu_seconds"] = client_cpu
    # CPU seconds the workers got per second of wall time and slot: below 1 on a shared,
    # loaded machine (the other processes' share), so Mvoxel per worker CPU second is the
    # figure that a load on the machine disturbs least
    row["worker_cpu_share"] = row["worker_cpu_seconds"] / (wall * args.workers * args.threads)
    row["mvoxel_per_worker_cpu_second"] = row["output_mvoxel"] / max(
        1e-9, row["worker_cpu_seconds"]
    )
    shutil.rmtree(out, ignore_errors=True)
    return row


def check_identity(inp: str, out: Path, slices: int = 4) -> int:
    """Max |output - input| over ``slices`` z-slices spread over the volume (grey levels)."""
    from emdiffuse.io import open_volume

    a, b = open_volume(inp).data, open_volume(str(out)).data
    zs = np.unique(np.linspace(0, a.shape[0] - 1, slices).astype(int))
    worst = 0
    for z in zs:
        x = np.asarray(a[int(z)]).astype(np.int16)
        y = np.asarray(b[int(z)]).astype(np.int16)
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


def summarise(name, options, wall, workers, local, out, args) -> dict:
    """The row of one configuration: throughput, the stage split, per-task costs."""
    import zarr

    base = zarr.open_array(f"{out}/0", mode="r")
    voxels = math.prod(base.shape)
    chunks = tuple(base.chunks)
    slots = args.workers * args.threads
    sec = workers["seconds"]
    cnt = workers["counts"]
    execute = local.get("execute", 0.0)
    tasks = sec.get("tile_task", 0.0) + sec.get("chunk_task", 0.0)
    n_tasks = cnt.get("tile_task", 0) + cnt.get("chunk_task", 0)
    split = {s: sec.get(s, 0.0) for s in TASK_STAGES}
    split["in-task other"] = max(0.0, tasks - sum(split.values()))
    split["scheduling/other"] = max(0.0, execute * slots - tasks)
    pyramid = local.get("pyramid", 0.0)
    split["pyramid"] = pyramid * slots
    split["setup"] = max(0.0, (wall - execute - pyramid) * slots)
    mvox = voxels / 1e6
    per_worker = mvox / wall / args.workers
    return {
        "config": name,
        "options": options,
        "output_shape": list(base.shape),
        "output_chunks": list(chunks),
        "output_mvoxel": mvox,
        "wall_seconds": wall,
        "execute_seconds": execute,
        "pyramid_seconds": pyramid,
        "mvoxel_per_s_per_worker": per_worker,
        "mvoxel_per_s_per_worker_execute_only": mvox / execute / args.workers if execute else None,
        "worker_seconds": split,
        "seconds_per_mvoxel_per_worker": {k: v / mvox for k, v in split.items()},
        "fraction": {k: v / (wall * slots) for k, v in split.items()},
        "tasks": {
            "tile_tasks": cnt.get("tile_task", 0),
            "chunk_tasks": cnt.get("chunk_task", 0),
            "ms_per_tile_task": 1e3 * sec.get("tile_task", 0.0) / max(1, cnt.get("tile_task", 0)),
            "ms_per_chunk_task": 1e3
            * sec.get("chunk_task", 0.0)
            / max(1, cnt.get("chunk_task", 0)),
            "scheduling_ms_per_task": 1e3 * split["scheduling/other"] / max(1, n_tasks),
            "network_calls": cnt.get("network", 0),
        },
        "stage_ms_per_chunk": {
            k: 1e3 * v / max(1, cnt.get("chunk_task", 0)) for k, v in split.items()
        },
        "raw_worker_stages": workers,
        "client_stages": local,
        "target_met": per_worker >= TARGET,
    }


# ---- report ------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    """The committed table and its reading (``<name>.md``)."""
    rows = result["rows"]
    prov = result["provenance"]
    lines = [
        "# Pipeline ceiling: output Mvoxel/s per worker with a network that costs nothing",
        "",
        f"Command: `{prov['command']}` (in `{prov['cwd']}`), "
        f"commit `{(prov['git']['commit'] or '')[:10]}`"
        f"{' (dirty)' if prov['git']['dirty'] else ''}, {prov['utc']}.",
        "",
        f"Input {result['input_shape']} uint8 OME-Zarr; {result['workers']} worker process(es) "
        f"x {result['threads']} thread(s) on a LocalCluster; `{result['sampler']}` at "
        f"{result['steps']} steps, 1 sample; network: `IdentityNet` (returns its condition) "
        f"inside the shipped Enhancer. Machine: {result['machine']['cpu_count']} logical "
        f"CPUs, load average at start {result['load_average_start']}, at end "
        f"{result['load_average_end']}. Target: {TARGET:g} Mvoxel/s per worker.",
        "",
        "| config | output chunks | wall s | Mvoxel/s per worker | execute-only | "
        "worker CPU share | Mvoxel per worker CPU s | "
        "tile tasks | chunk tasks | ms / tile task | ms / chunk task | scheduling ms / task "
        "| max \\|out − in\\| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tasks"]
        lines.append(
            f"| {r['config']} | {'×'.join(map(str, r['output_chunks']))} | "
            f"{r['wall_seconds']:.1f} | **{r['mvoxel_per_s_per_worker']:.2f}** | "
            f"{r['mvoxel_per_s_per_worker_execute_only']:.2f} | "
            f"{r.get('worker_cpu_share', float('nan')):.2f} | "
            f"{r.get('mvoxel_per_worker_cpu_second', float('nan')):.2f} | {t['tile_tasks']} | "
            f"{t['chunk_tasks']} | {t['ms_per_tile_task']:.0f} | {t['ms_per_chunk_task']:.0f} | "
            f"{t['scheduling_ms_per_task']:.1f} | {r['max_abs_diff_to_input']} |"
        )
    lines += [
        "",
        "Time split (worker-seconds per output Mvoxel, and share of wall × worker slots; "
        "per output chunk in ms):",
        "",
        "| stage | " + " | ".join(r["config"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for stage in SPLIT:
        cells = [
            f"{r['seconds_per_mvoxel_per_worker'][stage] * 1e3:.1f} ms/Mvox "
            f"({100 * r['fraction'][stage]:.0f} %, {r['stage_ms_per_chunk'][stage]:.0f} ms/chunk)"
            for r in rows
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "## What bounds it", "", *reading(result), ""]
    return "\n".join(lines)


DEVICE_STAGES = ("network",)  # what a GPU worker runs on the device (the sampler's loop)


def reading(result: dict) -> list[str]:
    """What bounds the ceiling, in numbers from ``result`` (its first row is the baseline)."""
    rows = result["rows"]
    base = rows[0]
    per = {k: v * 1e3 for k, v in base["seconds_per_mvoxel_per_worker"].items()}
    budget = 1e3 / TARGET
    top = sorted(per.items(), key=lambda kv: -kv[1])[:4]
    host = {k: v for k, v in per.items() if k not in DEVICE_STAGES}
    host_total = sum(host.values())
    t = base["tasks"]
    text = [
        f"- **Measured**: {base['mvoxel_per_s_per_worker']:.2f} Mvoxel/s per worker with the "
        f"pipeline's defaults, {TARGET / base['mvoxel_per_s_per_worker']:.0f}× below the "
        f"{TARGET:g} Mvoxel/s target, whose budget is {budget:.0f} ms of worker time per output "
        f"Mvoxel; the run spent {sum(per.values()):.0f}. Largest shares: "
        + ", ".join(
            f"{k} {v:.0f} ms/Mvoxel ({base['stage_ms_per_chunk'][k]:.0f} ms per "
            f"{'×'.join(map(str, base['output_chunks']))} chunk)"
            for k, v in top
        )
        + ".",
        f"- **`network`** with a network that costs nothing is the Enhancer's own work on the "
        f"CPU: the sampler's {result['steps']} steps of element-wise arithmetic, the "
        f"concatenation of condition and sample at every step, the copies in and out of torch "
        f"({1e3 * base['raw_worker_stages']['seconds'].get('network', 0) / max(1, t['network_calls']):.1f} "
        f"ms per batch of tiles). On a GPU worker this runs on the device.",
        f"- **What stays on the host with a GPU** (every stage but `network`): "
        f"{host_total:.0f} ms/Mvoxel, a ceiling of {1e3 / host_total:.1f} Mvoxel/s per worker on "
        f"this CPU. Of it, `noise` ({host['noise']:.0f} ms/Mvoxel: the counter-based Philox "
        f"normal draws of every tile, tile overlap included) alone caps a worker at "
        f"{1e3 / host['noise']:.0f} Mvoxel/s; `blend` ({host['blend']:.0f}), `pyramid` "
        f"({host['pyramid']:.0f}, built by the client after the last chunk) and `read` + "
        f"`write` ({host['read'] + host['write']:.0f}) follow.",
        f"- **Scheduling**: {t['scheduling_ms_per_task']:.1f} ms of worker time per task outside "
        f"any task ({t['tile_tasks']} tile + {t['chunk_tasks']} chunk tasks; "
        f"{per['scheduling/other']:.0f} ms/Mvoxel) — "
        f"{100 * per['scheduling/other'] / budget:.0f} % of the target's budget by itself.",
    ]
    if "worker_cpu_share" in base:
        text.append(
            f"- **A shared machine**: the worker got {base['worker_cpu_share']:.2f} CPU seconds "
            f"per second of wall time (load average {result['load_average_start']} at the start, "
            f"{result['load_average_end']} at the end, other users' jobs included); per worker "
            f"CPU second it wrote {base['mvoxel_per_worker_cpu_second']:.2f} Mvoxel, about what "
            f"an unshared core would give per second."
        )
    if len(rows) > 1:
        nets = [r["seconds_per_mvoxel_per_worker"]["network"] * 1e3 for r in rows]
        shares = [r.get("worker_cpu_share", float("nan")) for r in rows]
        text.append(
            f"- **How far to trust a comparison**: the `network` stage does the same work per "
            f"voxel in every configuration, yet took {min(nets):.0f}–{max(nets):.0f} ms/Mvoxel "
            f"(worker CPU share {min(shares):.2f}–{max(shares):.2f}): the load of the shared "
            f"machine moves a configuration's figures by that much. Stage shares within a row, "
            f"and `scheduling/other` per task, are steadier than throughput ratios."
        )
    for r in rows[1:]:
        rp = {k: v * 1e3 for k, v in r["seconds_per_mvoxel_per_worker"].items()}
        text.append(
            f"- **{r['config']}** (`{r['options']}`): {r['tasks']['tile_tasks']} + "
            f"{r['tasks']['chunk_tasks']} tasks, scheduling {rp['scheduling/other']:.1f} "
            f"ms/Mvoxel ({r['tasks']['scheduling_ms_per_task']:.1f} ms per task), "
            f"{r['mvoxel_per_s_per_worker']:.2f} Mvoxel/s per worker "
            f"({r['mvoxel_per_s_per_worker'] / base['mvoxel_per_s_per_worker']:.2f}× the default "
            f"in this run)."
        )
    return text


def plot(result: dict, path: Path) -> None:
    """Stacked bars: seconds per output Mvoxel per worker, by stage, one bar per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * len(rows)))
    colors = plt.get_cmap("tab20").colors
    names = [r["config"] for r in rows]
    left = np.zeros(len(rows))
    for i, stage in enumerate(SPLIT):
        values = np.array([r["seconds_per_mvoxel_per_worker"][stage] * 1e3 for r in rows])
        ax.barh(names, values, left=left, color=colors[i % len(colors)], label=stage)
        left += values
    ax.axvline(1e3 / TARGET, color="k", linestyle="--", linewidth=1)
    ax.text(
        1e3 / TARGET, 1.01, f"target {TARGET:g} Mvoxel/s", transform=ax.get_xaxis_transform(),
        ha="center", va="bottom", fontsize=8,
    )  # fmt: skip
    ax.set_xlabel("ms of worker time per output Mvoxel (= 1000 / Mvoxel/s per worker)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(
        f"Pipeline ceiling, identity network, {'×'.join(map(str, result['input_shape']))} uint8",
        pad=14,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict) -> None:
    print(markdown(result))


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,2048,2048", help="input z,y,x (uint8)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--name", default="pipeline_ceiling")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/emdiffuse/bench")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the .md and .png from the JSON"
    )
    args = parser.parse_args(argv)
    if args.table_only:
        import json

        path = args.out_dir / f"{args.name}.json"
        result = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(result))
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}", file=sys.stderr)
        return 0
    record = start_record(__file__, argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    load_start = load_average()
    inp = cached_input(args.cache, shape)
    work = Path(tempfile.mkdtemp(prefix="emdiffuse-ceiling-"))
    cluster, client = start_cluster(args.workers, args.threads)
    rows = []
    try:
        model = make_identity_model(work / "identity.safetensors")
        warm = cached_input(args.cache, (4, 512, 512))
        run_config("warm-up", {}, client, warm, model, work, args)  # imports, first tasks
        for name in names:
            print(f"running {name} ...", file=sys.stderr)
            row = run_config(name, CONFIGS[name], client, inp, model, work, args)
            print(
                f"  {name}: {row['mvoxel_per_s_per_worker']:.2f} Mvoxel/s per worker, "
                f"wall {row['wall_seconds']:.1f} s",
                file=sys.stderr,
            )
            rows.append(row)
    finally:
        stop_cluster(cluster, client)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "pipeline_ceiling",
        "provenance": record,
        "command": record["command"],
        "machine": machine_info(record),
        "input_shape": list(shape),
        "workers": args.workers,
        "threads": args.threads,
        "steps": args.steps,
        "sampler": args.sampler,
        "target_mvoxel_per_s_per_worker": TARGET,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.out_dir == RESULTS:
        path = write_results(args.name, result)
    else:
        import json

        path = args.out_dir / f"{args.name}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    plot(result, path.with_suffix(".png"))
    print_table(result)
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
