"""Does a trained model's output depend on how the run is cut into tasks, on a GPU?

The pipeline promises an output that does not depend on the chunking; how many output
chunks one task computes (``chunks_per_task``) decides which tiles share a network call,
and so the batch size of the last call of each task. On a CPU that changed nothing (0 grey
values, ``gpu.py``'s pipeline rows); on an H200 with random weights 2×2×2 chunks per task
changed the 8-NFE output by up to 235 of 255 grey values (``gpu_pipeline.md``). Random
weights amplify any rounding through the sampler, so this benchmark asks the question with a
trained model: the demo denoiser (``--model``) enhancing the demo's synthetic held-out
volume, once per precision × network (eager, compiled: every call padded to one batch size)
× chunks per task (1, 2×2×2). Each row: the largest and mean difference to the same
precision and network with one chunk per task (grey values of a uint8 rendering of the
output range), the fraction of voxels that differ by more than one grey value, and the
PSNR against the clean truth.

    python benchmarks/gpu_chunking.py --model MODEL.safetensors --out OUT [--shape 8,1024,1024]

Writes ``<out>/<name>.json`` (with provenance) and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_record  # noqa: E402

CHUNKINGS = (1, (2, 2, 2))


def grey(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` on a 0–255 grey scale over ``[low, high]`` (float, not rounded)."""
    return (values - low) / (high - low) * 255.0


def run(args: argparse.Namespace) -> dict:
    import torch

    import emdiffuse
    from emdiffuse import io, metrics
    from emdiffuse.demo import HELD_OUT_ORIGIN
    from emdiffuse.training.demo_model import demo_pair

    record = start_record(__file__, args.argv)
    begin = time.perf_counter()
    shape = tuple(int(v) for v in args.shape.split(","))
    noisy, clean = demo_pair(shape, origin=HELD_OUT_ORIGIN, seed=0, noise_seed=101)
    low, high = float(clean.min()), float(clean.max())
    work = Path(tempfile.mkdtemp(prefix="emdiffuse-chunking-"))
    try:
        inp = work / "noisy.ome.zarr"
        io.write_image(noisy, inp, voxel_size=(8.0, 8.0, 8.0))
        rows, firsts = [], {}
        precisions = args.precisions.split(",")
        for precision in precisions:
            for compiled in (False, True) if args.compile else (False,):
                for per_task in CHUNKINGS:
                    start = time.perf_counter()
                    out = emdiffuse.enhance(
                        inp, args.model, work / "out.ome.zarr", steps=args.steps,
                        samples=args.samples, seed=0, dtype="float32", overwrite=True,
                        scheduler="threads", workers=1, progress=False, device=args.device,
                        precision=precision, batch_size=args.batch_size, compile=compiled,
                        chunks=args.chunks, chunks_per_task=per_task,
                    )  # fmt: skip
                    enhanced = np.asarray(out.values, np.float32)  # read back once
                    values = grey(enhanced.astype(np.float64), low, high)
                    seconds = time.perf_counter() - start
                    key = (precision, compiled)
                    first = firsts.setdefault(key, values)
                    diff = np.abs(values - first)
                    reference = firsts[(precisions[0], False)]
                    rows.append({
                        "precision": precision,
                        "network": "compiled" if compiled else "eager",
                        "chunks_per_task": per_task,
                        "max_abs_diff": float(diff.max()),
                        "mean_abs_diff": float(diff.mean()),
                        "fraction_over_1_grey": float((diff > 1.0).mean()),
                        "max_abs_diff_to_first_row": float(np.abs(values - reference).max()),
                        "psnr": metrics.psnr(enhanced, clean,
                                             data_range=high - low),
                        "seconds": seconds,
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:  # the input and outputs are scratch
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "gpu_chunking",
        "provenance": record,
        "device": args.device,
        "device_name": (torch.cuda.get_device_name()
                        if args.device != "cpu" and torch.cuda.is_available() else "cpu"),
        "model": str(args.model),
        "shape": list(shape),
        "chunks": args.chunks,
        "steps": args.steps,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "rows": rows,
        "wall_seconds": time.perf_counter() - begin,
    }


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [
        f"# Chunking invariance on {result['device_name']}",
        "",
        f"Command: `{prov['command']}`, commit `{(prov['git']['commit'] or '')[:10]}`"
        f"{' (dirty)' if prov['git']['dirty'] else ''}, {prov['utc']}; "
        f"torch {prov['versions']['torch']}; {result['wall_seconds']:.0f} s.",
        "",
        f"Model `{Path(result['model']).name}`, the demo's synthetic held-out volume "
        f"{result['shape']} (zyx), chunks {result['chunks']}, {result['steps']} steps, "
        f"samples {result['samples']}, batch {result['batch_size'] or 'the default'}. "
        "Differences in grey values (0–255 over the clean volume's range), against the "
        "same precision and network with one chunk per task.",
        "",
        "| precision | network | chunks per task | max diff | mean diff | voxels > 1 grey "
        "| max diff to the first row | PSNR dB | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['precision']} | {r['network']} | {r['chunks_per_task']} | "
            f"{r['max_abs_diff']:.3g} | {r['mean_abs_diff']:.3g} | "
            f"{100 * r['fraction_over_1_grey']:.3g} % | {r['max_abs_diff_to_first_row']:.3g} | "
            f"{r['psnr']:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained denoiser (the demo's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="gpu_chunking")
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda")
    p.add_argument("--shape", default="8,1024,1024", help="zyx voxels")
    p.add_argument("--chunks", type=int, default=None, help="chunk side (default: the run's)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="also the compiled network")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    args.argv = argv
    if not Path(args.model).exists():
        p.error(f"--model {args.model}: no such file")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
