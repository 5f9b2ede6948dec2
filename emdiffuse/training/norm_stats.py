"""Batch-norm statistics of the averaged network, re-estimated at the end of training.

During training a batch-norm layer keeps running averages of its live network's batch
statistics over the last few steps. The saved model is the EMA of the weights, whose
activations differ a little from the live network's, so its own statistics are estimated
once more (torch's ``swa_utils.update_bn``: a cumulative average over training batches): the
mean network of the EMA copy, the only part with batch norm, over the conditions of
:data:`NORM_BATCHES` training batches, upsampled as a training step does. Networks without
batch norm are left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.variants import ModelConfig

# training batches the averaged mean network's batch-norm statistics are estimated on
NORM_BATCHES = 32


def batch_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``net``."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def training_batches(dataset: Any, batch_size: int, count: int = NORM_BATCHES) -> Iterator[dict]:
    """``count`` training batches of ``batch_size`` from ``dataset`` (a
    :class:`~emdiffuse.training.loader.PatchDataset`), keyed 0, 1, …: the same every run."""
    for i in range(count):
        yield dataset.batch(range(i * batch_size, (i + 1) * batch_size), split="train")


def refresh_batch_norm(
    mean_net: nn.Module,
    dataset: Any,
    batch_size: int,
    config: ModelConfig,
    device: torch.device,
    autocast: torch.dtype | None,
) -> int:
    """Re-estimate ``mean_net``'s batch-norm statistics on :func:`training_batches` of
    ``dataset``; its train/eval mode is kept. Returns the number of layers refreshed (0:
    none, and no batch is read)."""
    layers = len(batch_norms(mean_net))
    if layers:
        conds = (upsample_xy(b["cond"].to(device), config.xy_scale, config.cond_upsample)
                 for b in training_batches(dataset, batch_size))  # fmt: skip
        with torch.autocast(device_type=device.type, dtype=autocast or torch.bfloat16,
                            enabled=autocast is not None):  # fmt: skip
            update_bn(conds, mean_net)
    return layers


__all__ = ["NORM_BATCHES", "batch_norms", "refresh_batch_norm", "training_batches"]
