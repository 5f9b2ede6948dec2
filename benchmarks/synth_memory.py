"""Peak memory and speed of `emdiffuse synth` on a large volume (default 512 x 2048 x 2048
uint8, denoise: the clean volume plus the noisy one, both multiscale OME-Zarr).

    python benchmarks/synth_memory.py [--shape 512,2048,2048] [--task denoise] [--keep]

Runs the command under `/usr/bin/time -v` (Debian package `time`), reads "Maximum resident
set size" and the wall time, prints a table and writes benchmarks/results/synth_memory.json.
The output goes to a temporary directory that is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

RESULTS = Path(__file__).parent / "results" / "synth_memory.json"
GOAL_MB = 2048.0

# --proxy: the same generation and degradation graph as `emdiffuse synth --task denoise`,
# written with plain dask.array.to_zarr (level 0 only, no pyramid, no OME metadata); for
# when emdiffuse.io is not available. Recorded as such in the JSON.
PROXY = """
import sys, dask.array as da, numpy as np
from emdiffuse.training.synthetic import synthetic_volume
from emdiffuse.training.degrade import degrade_volume
out, shape, chunks = sys.argv[1], eval(sys.argv[2]), eval(sys.argv[3])
clean = synthetic_volume(shape, seed=0, chunks=chunks)
(clean.clip(0, 1) * 255 + 0.5).astype(np.uint8).to_zarr(out + '/clean.zarr')
stored = da.from_zarr(out + '/clean.zarr')
noisy = degrade_volume(stored.astype(np.float32) / 255, 'denoise', dose=20.0, seed=0)
(noisy.clip(0, 1) * 255 + 0.5).astype(np.uint8).to_zarr(out + '/noisy.zarr')
print('wrote', out)
"""


def _emdiffuse_command() -> list[str]:
    exe = shutil.which("emdiffuse")
    if exe is None:
        candidate = Path(sys.executable).parent / "emdiffuse"
        if candidate.exists():
            exe = str(candidate)
    return [exe] if exe else [sys.executable, "-m", "emdiffuse.cli"]


def _du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="512,2048,2048")
    parser.add_argument("--task", default="denoise")
    parser.add_argument("--dtype", default="uint8")
    parser.add_argument("--chunks", default="64,256,256")
    parser.add_argument("--keep", action="store_true", help="keep the written volumes")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="measure the generation graph written with plain to_zarr (no emdiffuse.io)",
    )
    args = parser.parse_args()
    record = provenance()

    if not Path("/usr/bin/time").exists():
        print("/usr/bin/time is missing: install it with `apt-get install time`", file=sys.stderr)
        return 1
    shape = tuple(int(v) for v in args.shape.split(","))
    voxels = shape[0] * shape[1] * shape[2]
    tmp = Path(tempfile.mkdtemp(prefix="emdiffuse-synth-bench-"))
    free_gb = shutil.disk_usage(tmp).free / 1e9
    print(f"temporary output {tmp} ({free_gb:.0f} GB free)")
    out = tmp / "synth"
    command = [
        "/usr/bin/time",
        "-v",
        *_emdiffuse_command(),
        "synth",
        str(out),
        "--shape",
        args.shape,
        "--task",
        args.task,
        "--dtype",
        args.dtype,
        "--chunks",
        args.chunks,
    ]
    if args.proxy:
        out.mkdir()
        chunks = tuple(int(v) for v in args.chunks.split(","))
        command = ["/usr/bin/time", "-v", sys.executable, "-c", PROXY, str(out)]
        command += [repr(shape), repr(chunks)]
    print(" ".join(command) if not args.proxy else "proxy run (plain to_zarr)")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(proc.stdout)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        written = _du_bytes(out)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    peak_mb = int(match.group(1)) / 1024 if match else float("nan")
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", proc.stderr)
    result = {
        "command": "python -c PROXY (see benchmarks/synth_memory.py)"
        if args.proxy
        else " ".join(command[2:]),
        "mode": "proxy: synthetic + noise graph, plain to_zarr level 0, no pyramid"
        if args.proxy
        else "emdiffuse synth (OME-Zarr with pyramids)",
        "shape": list(shape),
        "task": args.task,
        "dtype": args.dtype,
        "chunks": args.chunks,
        "voxels": voxels,
        "peak_rss_mb": round(peak_mb, 1),
        "goal_peak_rss_mb": GOAL_MB,
        "peak_over_goal": round(peak_mb / GOAL_MB, 3),
        "wall_s": round(wall, 1),
        "voxels_per_s": round(voxels / wall),
        "cpu_percent": int(cpu.group(1)) if cpu else None,
        "bytes_written": written,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": record,
    }
    rows = [
        ("shape", "x".join(map(str, shape)) + f" {args.dtype} ({args.task})"),
        (
            "peak RSS",
            f"{peak_mb:,.0f} MB (goal < {GOAL_MB:,.0f} MB: ratio {peak_mb / GOAL_MB:.2f})",
        ),
        ("wall time", f"{wall:,.1f} s"),
        ("throughput", f"{voxels / wall / 1e6:,.1f} Mvoxel/s (clean voxels)"),
        ("CPU", f"{result['cpu_percent']} % of one core"),
        ("written", f"{written / 1e9:,.2f} GB"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if peak_mb < GOAL_MB else 1


if __name__ == "__main__":
    sys.exit(main())
