"""DDP on 2 CPU processes (gloo): the gradient of one process with the global batch, and a
time-limited run that every rank stops at the same step with the same learning rates."""

from __future__ import annotations

import numpy as np
import torch
import torch.multiprocessing as mp
import zarr
from zarr.storage import LocalStore

from emdiffuse.models import diffusion
from emdiffuse.training.build import build_config, build_dataset, build_net
from emdiffuse.training.settings import TrainSettings
from emdiffuse.training.step import keyed_noise, training_loss

PER_RANK = 2


def _volume(root):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((4, 64, 64)), (0, 2, 2)).astype(np.float32)
    noisy = (clean + rng.normal(0, 0.05, clean.shape)).astype(np.float32)
    paths = []
    for name, data in (("noisy", noisy), ("clean", clean)):
        arr = zarr.create_array(store=LocalStore(f"{root}/{name}.zarr"), shape=data.shape,
                                dtype=data.dtype, chunks=(2, 32, 32))  # fmt: skip
        arr[...] = data
        paths.append(f"{root}/{name}.zarr")
    return paths


def _sources(paths):
    return [zarr.open_array(store=LocalStore(p, read_only=True), mode="r") for p in paths]


def _gradients(paths, batch_size, rank, world, model_wrap=None):
    """One training step's gradients (sum of per-sample keys as the trainer draws them)."""
    s = TrainSettings(task="denoise", data=[], batch_size=batch_size, patch=16,
                      region=32, seed=7)  # fmt: skip
    ds = build_dataset(s, _sources(paths), rank=rank, world_size=world)
    config = build_config(s, ds)
    net = build_net(config, seed=7)
    model = model_wrap(net) if model_wrap else net
    schedule = diffusion.Schedule.from_dict(dict(config.schedule))
    batch = ds.batch(ds.keys_for_step(0))
    noise, u = keyed_noise(batch["key"].tolist(), batch["target"].shape[1:], s.seed)
    loss = training_loss(model, batch["cond"], batch["target"], schedule,
                         config.prediction, config.loss, noise, u)  # fmt: skip
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}, batch["key"].tolist()


def _worker(rank, world, root, paths):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        grads, keys = _gradients(paths, PER_RANK, rank, world, DistributedDataParallel)
        torch.save({"grads": grads, "keys": keys}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_match_single_process(tmp_path):
    paths = _volume(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path), paths), nprocs=2, join=True)
    single, keys = _gradients(paths, 2 * PER_RANK, 0, 1)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["keys"] + r1["keys"] == keys  # the ranks split the global batch
    for name, g in single.items():
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r1["grads"][name], g, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in single.values())


def _timed_worker(rank, world, root, paths):
    """A whole ``trainer.train`` under a time limit on one run folder, as under torchrun;
    each rank records the step its loop stopped at (its log line)."""
    import logging

    import torch.distributed as dist

    from emdiffuse.training import trainer

    torch.set_num_threads(1)
    stops = []

    class Stops(logging.Handler):
        def emit(self, record):
            if "time limit" in record.getMessage():
                stops.append(record.args[1])

    logging.getLogger("emdiffuse.training.trainer").addHandler(Stops())
    logging.getLogger("emdiffuse.training.trainer").setLevel(logging.INFO)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        trainer.train("denoise", _sources(paths), f"{root}/run", steps=10**6, batch_size=PER_RANK,
                      patch=16, region=32, warmup=0, lr=1e-3, lr_schedule="cosine",
                      time_limit=3.0, val_every=10**6, ckpt_every=10**6, progress=False,
                      calibration_samples=0, error_refit_steps=0, fit_steps=0,
                      device="cpu")  # fmt: skip
        torch.save({"stops": stops}, f"{root}/timed{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_time_limit_stops_every_rank_at_the_same_step(tmp_path):
    import csv

    paths = _volume(tmp_path)
    mp.spawn(_timed_worker, args=(2, str(tmp_path), paths), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "timed0.pt", weights_only=True)["stops"]
    s1 = torch.load(tmp_path / "timed1.pt", weights_only=True)["stops"]
    assert len(s0) == 1 and s0 == s1 and s0[0] > 0  # one clock: the same last step
    with open(tmp_path / "run" / "scalars.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr")]
    # scalars.csv ends at the step the clock stopped (not at the last multiple of 10), and
    # the cosine followed that clock: by steps alone (of 10**6) it would still be at its
    # peak 1e-3; on the clock its last step came within one step's time of the limit
    assert int(rows[-1]["step"]) == s0[0]
    assert float(rows[-1]["lr"]) < 0.5e-3
