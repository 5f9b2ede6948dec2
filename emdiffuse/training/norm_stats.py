"""Batch-norm statistics of the averaged network, and its output offset, re-estimated at the
end of training.

During training a batch-norm layer keeps running averages of its live network's batch
statistics over the last few steps. The saved model is the EMA of the weights, whose
activations differ a little from the live network's, so its own statistics are estimated
once more (torch's ``swa_utils.update_bn``: a cumulative average over training batches): the
mean network of the EMA copy, the only part with batch norm, over the conditions of
:data:`NORM_BATCHES` training batches, upsampled as a training step does.

Those statistics do not make the network unbiased. Training normalises each layer with the
batch's own statistics, so the body sees every batch's intensities relative to the batch,
and the output convolution's bias is fitted to that; at inference the fixed population
statistics give a different, nonlinear, map, whose average is off by a constant (FlyEM
denoising, 2 e⁻/px: −0.6 % and +0.4 % of the range for two seeds, the same on the training
volume as on the held-out one). So, once the statistics are set, the mean error of the
eval-mode network over the same batches is added to its output (:func:`refresh_mean_network`
does both). Networks without batch norm are left untouched: they compute the same map in
training as at inference.
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


def refresh_mean_network(
    mean_net: nn.Module,
    dataset: Any,
    batch_size: int,
    config: ModelConfig,
    device: torch.device,
    autocast: torch.dtype | None,
) -> tuple[int, torch.Tensor | None]:
    """Re-estimate ``mean_net``'s batch-norm statistics on :func:`training_batches` of
    ``dataset``, then add to its output the mean error (target − output, per output channel,
    model space) of its eval-mode output over the same batches, so that the error averages
    zero there. Its train/eval mode is kept. Returns the number of layers refreshed and the
    offset added: ``(0, None)``, and no batch read, for a network without batch norm."""
    layers = len(batch_norms(mean_net))
    if not layers:
        return 0, None
    was_training = mean_net.training
    # the batches read and upsampled once for both passes: NORM_BATCHES training batches
    # held at once, on the device
    batches = [(upsample_xy(b["cond"].to(device), config.xy_scale, config.cond_upsample),
                b["target"].to(device)) for b in training_batches(dataset, batch_size)]  # fmt: skip
    with torch.autocast(device_type=device.type, dtype=autocast or torch.bfloat16,
                        enabled=autocast is not None):  # fmt: skip
        update_bn((cond for cond, _ in batches), mean_net)
        mean_net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for cond, target in batches:
                error = (target.float() - mean_net(cond).float()).transpose(0, 1).flatten(1)
                total, count = total + error.sum(1), count + error.shape[1]
    offset = total / count
    mean_net.shift_output(offset)
    mean_net.train(was_training)
    return layers, offset


__all__ = ["NORM_BATCHES", "batch_norms", "refresh_mean_network", "training_batches"]
