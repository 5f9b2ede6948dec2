"""Loader throughput (patches/s) versus what the trainer consumes (steps/s × batch), on CPU.

Writes a chunked zarr pair (noisy, clean) to a temporary directory, then measures, in one run:

* the PatchDataset loader (denoise and isotropic recipes) through a DataLoader with 0 and 2
  worker processes: patches per second, after the first batch (cold cache included);
* the trainer's consumption: training steps per second of the tiny model × batch size.

The ratio loader / trainer says whether the loader could starve training (ratio < 1).

    python benchmarks/loader_throughput.py [--batches 20] [--patch 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from provenance import provenance
from zarr.storage import LocalStore

from emdiffuse.training.build import build_config, build_net
from emdiffuse.training.loader import PatchDataset, make_loader
from emdiffuse.training.settings import TrainSettings
from emdiffuse.training.step import train_step

RESULTS = Path(__file__).parent / "results" / "loader_throughput.json"


def _volume(root: Path, shape, chunks) -> list:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random(shape, dtype=np.float32), (0, 2, 2))
    noisy = clean + rng.normal(0, 0.05, shape).astype(np.float32)
    arrays = []
    for name, data in (("noisy", noisy), ("clean", clean)):
        path = str(root / f"{name}.zarr")
        arr = zarr.create_array(store=LocalStore(path), shape=shape, dtype="float32", chunks=chunks)
        arr[...] = data
        arrays.append(zarr.open_array(store=LocalStore(path, read_only=True), mode="r"))
    return arrays


def loader_rate(dataset: PatchDataset, workers: int, batches: int) -> float:
    it = iter(make_loader(dataset, workers=workers))
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return batches * dataset.batch_size / dt


def trainer_rate(dataset: PatchDataset, steps: int) -> float:
    from emdiffuse.models import diffusion

    s = TrainSettings(task="denoise", data=[], batch_size=dataset.batch_size,
                      patch=dataset.patch[0])  # fmt: skip
    config = build_config(s, dataset)
    net = build_net(config, 0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    schedule = diffusion.Schedule.from_dict(dict(config.schedule))
    batch = dataset.batch(range(dataset.batch_size))
    dev = torch.device("cpu")
    train_step(net, net, opt, batch, schedule, config, s, dev, None)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(net, net, opt, batch, schedule, config, s, dev, None)
    dt = time.perf_counter() - t0
    return steps * dataset.batch_size / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    record = provenance()
    torch.manual_seed(0)
    shape, chunks = (32, 512, 512), (8, 128, 128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        noisy, clean = _volume(Path(tmp), shape, chunks)
        common = dict(batch_size=args.batch_size, seed=0)
        recipes = {
            "denoise": lambda: PatchDataset("denoise", [noisy, clean], args.patch, **common),
            "isotropic": lambda: PatchDataset(
                "isotropic", [clean], args.patch, factor=4, **common
            ),  # fmt: skip
        }
        for recipe, make in recipes.items():
            for workers in (0, 2):
                rate = loader_rate(make(), workers, args.batches)
                rows.append({"what": f"loader {recipe}", "workers": workers, "patches_per_s": rate})
        consume = trainer_rate(recipes["denoise"](), args.train_steps)
    rows.append({"what": "trainer (tiny, CPU)", "workers": None, "patches_per_s": consume})
    for row in rows:
        row["ratio_to_trainer"] = row["patches_per_s"] / consume
    print(f"{'what':24s} {'workers':>7s} {'patches/s':>10s} {'x trainer':>10s}")
    for row in rows:
        w = "" if row["workers"] is None else str(row["workers"])
        print(f"{row['what']:24s} {w:>7s} {row['patches_per_s']:10.1f} "
              f"{row['ratio_to_trainer']:10.1f}")  # fmt: skip
    result = {
        "benchmark": "loader_throughput",
        "volume_shape": shape,
        "chunks": chunks,
        "patch": args.patch,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "rows": rows,
        "loader_never_bottleneck": all(r["ratio_to_trainer"] >= 1 for r in rows),
        "command": "python benchmarks/loader_throughput.py",
        "provenance": record,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
