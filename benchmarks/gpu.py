"""One command for a GPU machine: network speed options and the full pipeline at 8 NFE.

    python benchmarks/gpu.py                       # on a GPU: < 5 min, writes results/gpu.{json,md}
    python benchmarks/gpu.py --smoke --out DIR     # anywhere (CPU): seconds, the suite's smoke test

No downloads: the model is the ``reference`` preset of ``emdiffuse-n`` (the published
EMDiffuse UNet: 32 base channels, multipliers 1-2-4-8, two residual blocks per level,
attention at 16×16) with seeded random weights (a network's speed does not depend on its
weights), on 256×256 tiles. ``--smoke``: the ``tiny`` preset on 32×32 tiles, batch sizes
1 and 2, one timed batch each, a 1×64×64 pipeline volume.

1. **Network evaluations/s**: one evaluation is one forward pass of the UNet on a batch of
   tiles (what a sampler step costs). For every combination of precision (``fp32``;
   ``bf16`` autocast), ``torch.compile`` (off; on — on CUDA only unless ``--compile on``,
   at ``--compile-batch-sizes`` to bound compile time; recorded as skipped with the reason
   where it is unavailable or fails) and ``channels_last`` (off/on) and each batch size
   (1–64): evaluations/s (tiles/s) timed after a warm-up until ``--min-seconds`` have
   passed (CUDA synchronised), the device memory peak (``torch.cuda.max_memory_allocated``;
   null on CPU), the Mvoxel/s of output at 8 NFE this rate allows (tiles/s × tile voxels /
   8, before tile overlap), and the fraction of the device's FLOP limit (FLOPs of one
   evaluation counted by ``torch.utils.flop_counter.FlopCounterMode`` × evaluations/s over
   :data:`PEAK_TFLOPS`; null on CPU or an unlisted device).
2. **Correctness of each speed option**: the network output of every combination, on one
   fixed batch, against eager fp32 without channels_last: max abs difference, within
   :data:`TOLERANCE` (fp32 options: 1e-3; bf16: 5e-2, in the units of the network's
   output, whose values are of order 1) or not.
3. **The full pipeline**: ``emdiffuse.enhance`` of a synthetic uint8 OME-Zarr volume
   (``--pipeline-shape``, default 8×2048×2048) with the same model at ``dpmpp_2m``, 8
   steps (8 NFE), one sample, the benchmark's tile (default overlap), ``--pipeline-batch-size``, bf16 on CUDA
   (fp32 on CPU), on a LocalCluster with one worker (``GPU=1`` on CUDA) after a small
   warm-up run, with one output chunk per task (the default) and with 2×2×2 — and, where
   compile is timed, with the network compiled (``enhance(compile=True)``; its warm-up
   compiles, timed apart): output Mvoxel/s, the largest difference of its output to the
   first row's (grey values: what task size or compile change), the worker's device memory
   peak and the pipeline's stage split (:mod:`emdiffuse.pipeline.stages`, worker seconds).
   ``--pipeline-precision`` overrides the precision (e.g. ``auto``, what a CPU user gets).

``--size`` and ``--tile`` choose another preset and tile (e.g. ``--device cpu --size tiny
--compile on`` measures the compiled network and pipeline on a CPU).

``--budget-s`` (default 200, so that the pipeline's minute or so fits in 5) bounds the
microbenchmarks: eager combinations run first, and those left when it is spent (compile,
whose first call at a batch shape compiles for tens of seconds) are recorded as skipped. Writes ``<out>/<name>.json`` (with provenance) and ``<name>.md``;
``--out`` defaults to ``benchmarks/results`` on a GPU and must be given on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, load_average, make_input, start_record

# Dense (no sparsity) peak TFLOP/s of NVIDIA's data sheets: "NVIDIA H100 Tensor Core GPU"
# data sheet (H100 SXM / PCIe / NVL columns) and the "NVIDIA H200 Tensor Core GPU" product
# page (H200 SXM / NVL). The sheets quote tensor-core figures "with sparsity"; the dense
# figure is half of it. "fp32" is the TF32 tensor-core peak, the one that applies when
# torch lets cuDNN run fp32 convolutions as TF32 (its default,
# torch.backends.cudnn.allow_tf32); "fp32_cuda_cores" the plain FP32 peak.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.5, "fp32": 494.7, "fp32_cuda_cores": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp32": 378.0, "fp32_cuda_cores": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp32": 417.5, "fp32_cuda_cores": 60.0},
    "H200 SXM": {"bf16": 989.5, "fp32": 494.7, "fp32_cuda_cores": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp32": 417.5, "fp32_cuda_cores": 60.0},
}
PEAK_SOURCE = (
    "NVIDIA H100 Tensor Core GPU data sheet and H200 Tensor Core GPU product page; dense "
    "tensor-core peaks (half the 'with sparsity' figures); fp32 = TF32 tensor cores"
)
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # max abs difference to eager fp32, network output
NFE = 8
PIPELINE_STAGES = ("read", "normalise", "gather", "noise", "network", "blend", "write",
                   "tile_task", "chunk_task")  # fmt: skip
FULL_BATCHES = (1, 2, 4, 8, 16, 32, 64)
SMOKE_BATCHES = (1, 2)


def device_peak(name: str) -> tuple[str | None, dict[str, float] | None]:
    """The :data:`PEAK_TFLOPS` entry of a CUDA device name (SXM when the name says neither
    PCIe nor NVL), or ``(None, None)``."""
    for gpu in ("H200", "H100"):
        if gpu in name:
            form = "PCIe" if "PCIe" in name else "NVL" if "NVL" in name else "SXM"
            key = f"{gpu} {form}"
            return key, PEAK_TFLOPS.get(key)
    return None, None


def peak_of(peak: dict[str, float], precision: str) -> float:
    """The peak TFLOP/s that bounds ``precision``: bf16 tensor cores; for fp32 the TF32
    tensor cores when cuDNN may use them (torch's default), else the FP32 cores."""
    if precision == "fp32" and not torch.backends.cudnn.allow_tf32:
        return peak["fp32_cuda_cores"]
    return peak[precision]


def make_network(size: str, device: torch.device, seed: int = 0):
    """The ``emdiffuse-n`` UNet of preset ``size`` with seeded random weights, eval mode,
    and its config."""
    from emdiffuse.models.networks import build_network
    from emdiffuse.models.presets import make_config

    config = make_config("emdiffuse-n", size, normalization={"low": 0.0, "high": 255.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(config)
        with torch.no_grad():  # zero-initialised layers (the output convolution) made random,
            for p in net.parameters():  # so that the output, and its check, is not all zeros
                if not p.any():
                    p.normal_(0.0, 0.02)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, config


def batch_inputs(config, batch: int, tile: int, device: torch.device, seed: int = 1):
    """A fixed batch: (condition ‖ noisy target) in [-1, 1] and a noise level per tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, config.unet.in_channels, tile, tile), generator=g) * 2 - 1
    level = torch.full((batch,), 0.5)
    return x.to(device), level.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One combination of speed options: a callable network for a batch shape."""

    def __init__(self, net, precision: str, compile_: bool, channels_last: bool, device):
        self.precision, self.compile, self.channels_last = precision, compile_, channels_last
        self.device = device
        self.net = net
        self.compiled = None

    @property
    def name(self) -> str:
        return (
            f"{self.precision}{' compile' if self.compile else ''}"
            f"{' channels_last' if self.channels_last else ''}"
        )

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile:
            if self.compiled is None:
                self.compiled = torch.compile(self.net, dynamic=False)
            net = self.compiled
        with torch.inference_mode(), self._autocast():
            return net(x, level).float()


def prepare_net(net, channels_last: bool):
    """``net`` in the memory format asked for (a copy for channels_last)."""
    if not channels_last:
        return net
    import copy

    return copy.deepcopy(net).to(memory_format=torch.channels_last)


def time_variant(
    variant: Variant, config, batch: int, tile: int, min_seconds: float, min_iters: int = 3
) -> dict:
    """Evaluations/s and the memory peak of ``variant`` at ``batch``: one warm-up batch
    (two with ``min_iters`` > 1), then batches until ``min_seconds`` and ``min_iters``."""
    device = variant.device
    x, level = batch_inputs(config, batch, tile, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    variant(x, level)  # warm-up (and the compile, when on)
    if min_iters > 1:
        variant(x, level)
    _sync(device)
    warm = time.perf_counter() - start
    iters, elapsed, group = 0, 0.0, 1
    start = time.perf_counter()
    while elapsed < min_seconds or iters < min_iters:  # groups of doubling size, one sync each
        for _ in range(group):
            variant(x, level)
        _sync(device)
        iters += group
        group *= 2
        elapsed = time.perf_counter() - start
    rate = iters * batch / elapsed
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "evaluations_per_s": rate,
        "batches_timed": iters,
        "seconds_timed": elapsed,
        "warmup_seconds": warm,
        "peak_memory_bytes": peak,
        "mvoxel_per_s_at_8_nfe": rate * tile * tile * config.out_slices / NFE / 1e6,
    }


def count_flops(net, config, tile: int, device: torch.device) -> int:
    """FLOPs of one network evaluation of one tile (``FlopCounterMode``, batch 1, fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, level = batch_inputs(config, 1, tile, device)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(x, level)
    return int(counter.get_total_flops())


def compile_available(device: torch.device) -> str | None:
    """None when ``torch.compile`` can run here, else why not."""
    if not hasattr(torch, "compile"):
        return "torch.compile is not in this torch"
    try:
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor")
    except Exception as error:  # noqa: BLE001 - any import failure means: unavailable
        return f"torch.compile unavailable: {type(error).__name__}: {error}"
    return None


def wants_compile(args, device: torch.device) -> bool:
    """``--compile on``, or ``auto`` on CUDA."""
    return args.compile == "on" or (args.compile == "auto" and device.type == "cuda")


def network_rows(args, net, config, tile, device, peak, flops, deadline) -> tuple[list, list]:
    """The timings of every combination and batch size, and the correctness checks."""
    rows, checks = [], []
    want_compile = wants_compile(args, device)
    compile_problem = compile_available(device) if want_compile else None
    if not want_compile:
        compile_problem = "compile is timed on CUDA only (--compile on forces it)"
    check_batch = min(args.compile_batch_sizes) if want_compile else min(args.batch_sizes)
    x_check, level_check = batch_inputs(config, check_batch, tile, device, seed=2)
    reference = Variant(net, "fp32", False, False, device)(x_check, level_check).cpu()
    combos = [  # eager first: what the budget may leave out is compile, the slow optional part
        (p, c, cl) for c in (False, True) for p in args.precisions for cl in (False, True)
    ]
    for precision, compile_, channels_last in combos:
        base = {"precision": precision, "compile": compile_, "channels_last": channels_last}
        if compile_ and compile_problem is not None:
            rows.append(
                {**base, "batch_size": None, "status": "skipped", "reason": compile_problem}
            )
            continue
        if time.perf_counter() > deadline:
            rows.append({**base, "batch_size": None, "status": "skipped",
                         "reason": "time budget (--budget-s) spent"})  # fmt: skip
            continue
        variant = Variant(
            prepare_net(net, channels_last), precision, compile_, channels_last, device
        )
        batches = args.compile_batch_sizes if compile_ else args.batch_sizes
        try:
            out = variant(x_check, level_check).cpu()
            diff = float((out - reference).abs().max())
            tol = TOLERANCE[precision]
            checks.append({**base, "batch_size": check_batch, "max_abs_diff": diff,
                           "reference_max_abs": float(reference.abs().max()),
                           "tolerance": tol, "passed": diff <= tol})  # fmt: skip
        except Exception as error:  # noqa: BLE001 - e.g. an inductor without a compiler
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append({**base, "batch_size": None, "status": "skipped", "reason": reason})
            continue
        for batch in batches:
            if time.perf_counter() > deadline:
                rows.append({**base, "batch_size": batch, "status": "skipped",
                             "reason": "time budget (--budget-s) spent"})  # fmt: skip
                continue
            try:
                timing = time_variant(
                    variant, config, batch, tile, args.min_seconds, 1 if args.smoke else 3
                )
            except torch.cuda.OutOfMemoryError as error:
                rows.append({**base, "batch_size": batch, "status": "skipped",
                             "reason": f"out of memory: {str(error)[:120]}"})  # fmt: skip
                continue
            fraction = None
            if peak is not None:
                tflops = flops * timing["evaluations_per_s"] / 1e12
                fraction = tflops / peak_of(peak, precision)
                timing["tflops"] = tflops
            rows.append({**base, "batch_size": batch, "status": "ok", **timing,
                         "flop_fraction": fraction})  # fmt: skip
            print(
                f"  {variant.name:28s} batch {batch:3d}: "
                f"{timing['evaluations_per_s']:9.1f} evaluations/s",
                file=sys.stderr,
            )
    return rows, checks


def save_reference_checkpoint(path: Path, size: str) -> str:
    """The benchmark's model as a checkpoint (seeded random weights) for the pipeline."""
    from emdiffuse.models.checkpoints import save_checkpoint

    net, config = make_network(size, torch.device("cpu"))
    save_checkpoint(path, net.state_dict(), config)
    return str(path)


def _worker_memory() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _reset_worker_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


PIPELINE_CONFIGS = ({"chunks_per_task": 1}, {"chunks_per_task": (2, 2, 2)})
COMPILED_CONFIG = {"chunks_per_task": 1, "compile": True}


def pipeline_configs(want_compile: bool) -> tuple[dict, ...]:
    """The pipeline rows: :data:`PIPELINE_CONFIGS`, and the network compiled
    (:data:`COMPILED_CONFIG`) where compile is timed."""
    return PIPELINE_CONFIGS + ((COMPILED_CONFIG,) if want_compile else ())


def pipeline_rows(args, size: str, tile: int, device: torch.device, work: Path) -> list[dict]:
    """Output Mvoxel/s of ``emdiffuse.enhance`` at 8 NFE on a one-worker LocalCluster, one
    row per :func:`pipeline_configs` (the default task size, 2×2×2 chunks per task, and —
    where compile is timed — the network compiled). Each configuration first enhances a
    one-tile volume (the warm-up: model loading, and the compile, timed apart)."""
    from distributed import Client, LocalCluster

    import emdiffuse
    from emdiffuse.pipeline.run_record import read_run_config
    from emdiffuse.pipeline.stages import reset_stages, stage_seconds

    shape = tuple(int(v) for v in args.pipeline_shape.split(","))
    model = save_reference_checkpoint(work / "model.safetensors", size)
    start = time.perf_counter()
    inp = make_input(work / "in.ome.zarr", shape)
    warm_inp = make_input(work / "warm.ome.zarr", (1, tile, tile))
    write_seconds = time.perf_counter() - start
    cuda = device.type == "cuda"
    precision = args.pipeline_precision or ("bf16" if cuda else "fp32")
    options = dict(  # the tile given, so that the one-tile warm-up compiles the run's shape
        steps=NFE, sampler="dpmpp_2m", samples=1, batch_size=args.pipeline_batch_size,
        device="cuda" if cuda else "cpu", precision=precision, progress=False, tile=tile,
    )  # fmt: skip
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
        resources={"GPU": 1} if cuda else None,
    )  # fmt: skip
    client = Client(cluster)
    rows, first = [], None
    try:
        for i, config in enumerate(pipeline_configs(wants_compile(args, device))):
            start = time.perf_counter()
            emdiffuse.enhance(warm_inp, model, work / f"warm{i}.ome.zarr", client=client,
                              **options, **config)  # fmt: skip
            warmup = time.perf_counter() - start
            client.run(reset_stages)
            client.run(_reset_worker_memory)
            out_path = work / f"out{i}.ome.zarr"
            start = time.perf_counter()
            out = emdiffuse.enhance(inp, model, out_path, client=client, **options, **config)
            wall = time.perf_counter() - start
            stages = next(iter(client.run(stage_seconds).values()))
            memory = next(iter(client.run(_worker_memory).values()))
            record = read_run_config(out_path)
            values = np.asarray(out.values, dtype=np.float64)
            diff = None if first is None else float(np.abs(values - first).max())
            first = values if first is None else first
            voxels = math.prod(out.shape)
            tiles_voxels = _computed_voxels(record)
            rows.append({
                "input_shape": list(shape),
                "output_voxels": voxels,
                "steps": NFE,
                "sampler": "dpmpp_2m",
                "precision": precision,
                "batch_size": args.pipeline_batch_size,
                "chunks_per_task": config["chunks_per_task"],
                "compile": bool(config.get("compile", False)),
                "warmup_seconds": warmup,
                "tile": record["tile"],
                "overlap": record["overlap"],
                "chunks": record["chunks"],
                "redundancy": tiles_voxels / voxels if tiles_voxels else None,
                "input_write_seconds": write_seconds,
                "wall_seconds": wall,
                "mvoxel_per_s": voxels / wall / 1e6,
                "worker_peak_memory_bytes": memory,
                "worker_stage_seconds": stages["seconds"],
                "max_abs_diff_to_first": diff,  # output grey values, against the first row
            })  # fmt: skip
            shutil.rmtree(out_path, ignore_errors=True)
    finally:
        client.close()
        cluster.close()
    return rows


def _computed_voxels(record: dict) -> int | None:
    """Output-grid voxels the lattice's tiles compute (tiles × tile²), from the run record."""
    from emdiffuse.pipeline.lattice import Lattice

    try:
        lattice = Lattice(tuple(record["input_shape"]), record["tile"], record["overlap"])
    except Exception:  # noqa: BLE001 - informational only
        return None
    return lattice.n_tiles * record["tile"] ** 2


# ---- report ------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The table of a result (``<name>.md``)."""
    prov = result["provenance"]
    model = result["model"]
    lines = [
        f"# GPU benchmark{' (smoke)' if result['smoke'] else ''}: {result['device_name']}",
        "",
        f"Command: `{prov['command']}` (in `{prov['cwd']}`), commit "
        f"`{(prov['git']['commit'] or '')[:10]}`{' (dirty)' if prov['git']['dirty'] else ''}, "
        f"{prov['utc']}; torch {prov['versions']['torch']}; {result['wall_seconds']:.0f} s.",
        "",
        f"Model: `emdiffuse-n` preset `{model['size']}` (random weights), "
        f"{model['parameters'] / 1e6:.2f} M parameters, tile {model['tile']}², "
        f"{model['gflop_per_evaluation']:.2f} GFLOP per evaluation of one tile "
        f"(FlopCounterMode). Peak FLOP/s: {result['peak']['device'] or 'not listed (null)'}"
        f"{'' if result['peak']['tflops'] is None else ' ' + json.dumps(result['peak']['tflops'])}"
        f" TFLOP/s ({PEAK_SOURCE}).",
        "",
        "## Network evaluations",
        "",
        "| precision | compile | channels_last | batch | evaluations/s | Mvoxel/s at 8 NFE "
        "| peak memory MiB | FLOP-limit fraction | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["network"]:
        mem = r.get("peak_memory_bytes")
        lines.append(
            f"| {r['precision']} | {'on' if r['compile'] else 'off'} | "
            f"{'on' if r['channels_last'] else 'off'} | {_fmt(r['batch_size'], 'd')} | "
            f"{_fmt(r.get('evaluations_per_s'))} | {_fmt(r.get('mvoxel_per_s_at_8_nfe'), '.3g')} | "
            f"{_fmt(None if mem is None else mem / 2**20, '.0f')} | "
            f"{_fmt(r.get('flop_fraction'), '.3f')} | {r.get('reason', '')} |"
        )
    lines += [
        "",
        "## Speed options against eager fp32 (network output, one fixed batch)",
        "",
        "| precision | compile | channels_last | batch | max abs diff | output max abs "
        "| tolerance | within |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        lines.append(
            f"| {c['precision']} | {'on' if c['compile'] else 'off'} | "
            f"{'on' if c['channels_last'] else 'off'} | {c['batch_size']} | "
            f"{c['max_abs_diff']:.2e} | {c['reference_max_abs']:.2f} | {c['tolerance']:.0e} | "
            f"{'yes' if c['passed'] else 'NO'} |"
        )
    fp32_checked = any(c["precision"] == "fp32" for c in result["checks"])
    if result["device"].startswith("cuda") and result.get("cudnn_allow_tf32") and fp32_checked:
        lines += ["", "fp32 on this GPU is TF32 on the tensor cores (torch's default, "
                  "`torch.backends.cudnn.allow_tf32`), the reference included: fp32 variants "
                  "differ from it by TF32 rounding, which the fp32 tolerance (set for true "
                  "fp32, as on a CPU) does not allow for."]  # fmt: skip
    rows = result["pipeline"]
    lines += ["", "## Full pipeline at 8 NFE", ""]
    if not rows:
        lines.append("not run (`--no-pipeline`)")
    else:
        p = rows[0]
        lines += [
            f"`emdiffuse.enhance` of {'×'.join(map(str, p['input_shape']))} uint8, "
            f"`{p['sampler']}` {p['steps']} steps, {p['precision']}, batch {p['batch_size']}, "
            f"tile {p['tile']}/{p['overlap']}, chunks {p['chunks']}, redundancy "
            f"{_fmt(p['redundancy'], '.2f')}, one worker on a LocalCluster:",
            "",
            "| chunks per task | network | Mvoxel/s | wall s | warm-up s | max abs diff to the "
            "first row | worker device memory peak MiB | "
            + " | ".join(f"{k} s" for k in PIPELINE_STAGES) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(PIPELINE_STAGES),
        ]
        for p in rows:
            mem = p["worker_peak_memory_bytes"]
            st = p["worker_stage_seconds"]
            lines.append(
                f"| {p['chunks_per_task']} | {'compiled' if p.get('compile') else 'eager'} | "
                f"**{p['mvoxel_per_s']:.3g}** | {p['wall_seconds']:.1f} | "
                f"{_fmt(p.get('warmup_seconds'))} | {_fmt(p.get('max_abs_diff_to_first'), 'g')} | "
                f"{_fmt(None if mem is None else mem / 2**20, '.0f')} | "
                + " | ".join(f"{st.get(k, 0.0):.2f}" for k in PIPELINE_STAGES)
                + " |"
            )
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: runs on a CPU")
    parser.add_argument("--out", type=Path, help="folder for the results (required on CPU)")
    parser.add_argument("--name", default=None, help="file name (default gpu, gpu_smoke)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--size", choices=("tiny", "small", "reference"), default=None,
                        help="model preset (default reference; --smoke: tiny)")
    parser.add_argument("--tile", type=int, default=None, help="tile side (default 256; --smoke: 32)")
    parser.add_argument("--batch-sizes", type=_ints, default=None)
    parser.add_argument("--compile-batch-sizes", type=_ints, default=None)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--min-seconds", type=float, default=None)
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--pipeline-shape", default=None)
    parser.add_argument("--pipeline-batch-size", type=int, default=None)
    parser.add_argument("--pipeline-precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="the pipeline's precision (default: bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--no-pipeline", action="store_true")
    args = parser.parse_args(argv)
    record = start_record(__file__, argv)
    begin = time.perf_counter()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cpu" and args.out is None:
        parser.error("on a CPU give --out (benchmarks/results/ holds GPU figures)")
    out_dir = args.out or RESULTS
    name = args.name or ("gpu_smoke" if args.smoke else "gpu")
    size, tile = ("tiny", 32) if args.smoke else ("reference", 256)
    size, tile = args.size or size, args.tile or tile
    args.batch_sizes = args.batch_sizes or (SMOKE_BATCHES if args.smoke else FULL_BATCHES)
    args.compile_batch_sizes = args.compile_batch_sizes or ((2,) if args.smoke else (16,))
    args.precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in args.precisions if p not in TOLERANCE]
    if bad:
        parser.error(f"unknown precisions {bad}; choose from {list(TOLERANCE)}")
    args.min_seconds = args.min_seconds or (0.0 if args.smoke else 1.0)
    args.pipeline_shape = args.pipeline_shape or ("1,64,64" if args.smoke else "8,2048,2048")
    args.pipeline_batch_size = args.pipeline_batch_size or (2 if args.smoke else 16)
    if device.type == "cuda" and device.index is not None:  # plain "cuda": the current one
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_key, peak = device_peak(device_name) if device.type == "cuda" else (None, None)
    print(f"device: {device_name}; model {size}, tile {tile}", file=sys.stderr)

    net, config = make_network(size, device)
    parameters = sum(p.numel() for p in net.parameters())
    flops = count_flops(net, config, tile, device)
    deadline = begin + args.budget_s
    rows, checks = network_rows(args, net, config, tile, device, peak, flops, deadline)
    del net
    pipeline: list[dict] = []
    if not args.no_pipeline:
        work = Path(tempfile.mkdtemp(prefix="emdiffuse-gpu-"))
        try:
            pipeline = pipeline_rows(args, size, tile, device, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "gpu",
        "provenance": record,
        "smoke": bool(args.smoke),
        "device": str(device),
        "device_name": device_name,
        "load_average_end": load_average(),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "model": {
            "variant": "emdiffuse-n",
            "size": size,
            "tile": tile,
            "parameters": parameters,
            "flops_per_evaluation": flops,
            "gflop_per_evaluation": flops / 1e9,
        },
        "peak": {
            "device": peak_key,
            "tflops": peak,
            "source": PEAK_SOURCE if peak is not None else None,
        },
        "nfe": NFE,
        "tolerance": TOLERANCE,
        "network": rows,
        "checks": checks,
        "pipeline": pipeline,
        "wall_seconds": time.perf_counter() - begin,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


def _jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
