"""Batch-norm statistics of the averaged network, re-estimated at the end of training.

During training a batch-norm layer keeps running averages of its live network's batch
statistics over the last few steps. The saved model is the EMA of the weights, whose
activations differ a little from the live network's, so its own statistics are estimated
once more: the mean network of the EMA copy (the only part with batch norm) runs over
training batches in training mode with a cumulative average, then returns to eval mode.
Networks without batch norm are left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.variants import ModelConfig

# training batches the averaged mean network's batch-norm statistics are estimated on
NORM_BATCHES = 32


def batch_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``net``."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def refresh_batch_norm(
    mean_net: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    config: ModelConfig,
    device: torch.device,
    autocast: torch.dtype | None,
) -> int:
    """Re-estimate ``mean_net``'s batch-norm statistics as the plain average over
    ``batches`` (training batches: their ``cond``, upsampled as a training step does) and
    leave it in eval mode. Returns the number of layers refreshed (0: none to refresh)."""
    norms = batch_norms(mean_net)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches
    mean_net.train()
    try:
        for batch in batches:
            cond = upsample_xy(batch["cond"].to(device), config.xy_scale, config.cond_upsample)
            with torch.autocast(device_type=device.type, dtype=autocast or torch.bfloat16,
                                enabled=autocast is not None):  # fmt: skip
                mean_net(cond)
    finally:
        mean_net.eval()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return len(norms)


def training_batches(sample: Callable[[range], dict], batch_size: int, count: int = NORM_BATCHES):
    """``count`` training batches of ``batch_size`` from ``sample(keys)``, keyed 0, 1, …"""
    for i in range(count):
        yield sample(range(i * batch_size, (i + 1) * batch_size))


__all__ = ["NORM_BATCHES", "batch_norms", "refresh_batch_norm", "training_batches"]
