"""Data-parallel training (DDP): who this process is, and the few collective calls it makes.

Under ``torchrun`` (or any initialised process group) every rank trains on its own
``batch_size`` samples of the global batch (:mod:`emdiffuse.training.loader` hands each rank
its keys); rank 0 alone writes files. :func:`setup` joins or starts the process group,
:func:`teardown` ends one it started. The time limit is read from rank 0's clock
(:func:`rank0_value`), so all ranks stop at the same step with the same learning rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> Dist:
    """Join an initialised process group, start one when ``WORLD_SIZE`` > 1 (torchrun), or
    run alone (``nccl`` on GPUs, ``gloo`` on CPUs)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def teardown(d: Dist) -> None:
    """End the process group if :func:`setup` started it."""
    if d.owns_group:
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def rank0_value(d: Dist, value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (``value`` itself when alone): what decisions every
    rank must take alike, such as the time spent against a time limit, are read from one
    clock."""
    if d.world <= 1:
        return value
    held = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(held, src=0)
    return float(held.item())


def wrap(
    net: torch.nn.Module, d: Dist, device: torch.device, *, unused: bool = False
) -> torch.nn.Module:
    """The module the loop calls: ``net`` itself, or ``net`` in DDP on several ranks.
    ``unused``: some steps leave parameters without gradients (a mean-only warm-up)."""
    if d.world <= 1:
        return net
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=unused)


__all__ = ["Dist", "setup", "teardown", "barrier", "rank0_value", "wrap"]
