"""What the pipeline benchmarks share (pipeline_efficiency, pipeline_scaling, graph_scaling):
the run options, a seeded-random checkpoint, a synthetic input, a LocalCluster, the results
file with its provenance, and the machine's load."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
from provenance import load_average as load_average  # re-exported for the benchmarks
from provenance import provenance

RESULTS = Path(__file__).parent / "results"


# ---- the run options ------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser, *, chunks: str) -> None:
    """The ``enhance()`` options a pipeline benchmark varies, with the benchmarks' defaults
    (only the output chunks differ between them)."""
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--chunks", default=chunks)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)


def run_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``enhance()`` from :func:`add_run_arguments`' options."""
    return dict(
        steps=args.steps,
        tile=args.tile,
        overlap=args.overlap,
        chunks=tuple(int(v) for v in args.chunks.split(",")),
        sampler=args.sampler,
        batch_size=args.batch_size,
    )


# ---- model, input, cluster --------------------------------------------------------------------
def make_model(path: Path, *, seed: int = 0, size: str = "tiny", unet: dict | None = None) -> str:
    """A denoiser checkpoint of the ``size`` preset with seeded random weights, for uint8;
    ``unet`` overrides fields of the preset's UNet config."""
    from emdiffuse.models.checkpoints import save_checkpoint
    from emdiffuse.models.enhancer import Enhancer
    from emdiffuse.models.presets import make_config

    config = make_config("emdiffuse-n", size, normalization={"low": 0.0, "high": 255.0})
    if unet:
        config = replace(config, unet=replace(config.unet, **unet))
    enhancer = Enhancer.from_config(config, seed=seed)
    save_checkpoint(path, enhancer.net.state_dict(), config)
    return str(path)


def make_input(path: Path, shape: tuple[int, int, int], *, store_chunks=None) -> str:
    """A noisy synthetic EM volume (uint8 OME-Zarr, 8 nm voxels) of ``shape``."""
    import dask.array as da

    from emdiffuse.io import write_image
    from emdiffuse.training.degrade import add_poisson_gaussian_noise
    from emdiffuse.training.synthetic import synthetic_volume

    store_chunks = store_chunks or (1, min(shape[1], 512), min(shape[2], 512))
    clean = synthetic_volume(shape, seed=0, chunks=store_chunks)

    def noisy(block, block_info=None):
        origin = tuple(lo for lo, _ in block_info[0]["array-location"])
        image = add_poisson_gaussian_noise(block, dose=20.0, seed=1, origin=origin)
        return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)

    data = da.map_blocks(noisy, clean, dtype=np.uint8)
    write_image(data, path, voxel_size=(8.0, 8.0, 8.0), chunks=store_chunks)
    return str(path)


def start_cluster(workers: int, threads: int = 1):
    """A LocalCluster of ``workers`` processes x ``threads`` threads and its Client."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=None,
    )
    return cluster, Client(cluster)


def stop_cluster(cluster, client) -> None:
    client.close()
    cluster.close()


# ---- the results file ---------------------------------------------------------------------------
def start_record(script: str, argv: list[str] | None) -> dict:
    """The provenance of this run, taken at its start; ``argv`` as ``main(argv)`` got it
    (None: the process's own command line)."""
    return provenance(None if argv is None else [script, *argv])


def machine_info(record: dict) -> dict:
    """The flat machine and version fields these results have always had, read from the
    provenance ``record`` (which is the authoritative block)."""
    machine, versions, git = record["machine"], record["versions"], record["git"]
    return {
        "machine": machine["platform"],
        "processor": platform.processor() or platform.machine(),
        "cpu_count": machine["cpus_logical"],
        "python": versions["python"],
        "emdiffuse": versions["emdiffuse"],
        "git_commit": (git["commit"] or "")[:7],
        "torch": versions["torch"],
        "dask": versions["dask"],
        "distributed": versions["distributed"],
        "zarr": versions["zarr"],
        "numpy": versions["numpy"],
        "cuda": (machine["gpu"] or [None])[0],
        "bf16_hardware": _bf16_hardware(),
    }


def _bf16_hardware() -> str | None:
    from emdiffuse.models.device import cpu_bf16_hardware

    return cpu_bf16_hardware()


def bf16_hardware_label(payload: dict) -> str:
    """The CPU's bf16 hardware as a result records it (results from before the field say
    only whether the machine had AMX)."""
    found = payload["machine"].get("bf16_hardware")
    if found is None and "bf16_hardware" not in payload["machine"]:
        found = payload.get("bf16_hardware") or ("AMX" if payload.get("amx") else None)
    return found or "none"


def write_results(name: str, payload: dict) -> Path:
    """``benchmarks/results/<name>.json`` (numpy scalars and tuples made JSON)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def publish(name: str, payload: dict, markdown: str) -> None:
    """``results/<name>.json`` and ``results/<name>.md``, and the table printed."""
    write_results(name, payload)
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)
