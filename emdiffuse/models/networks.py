"""The network of a :class:`~emdiffuse.models.variants.ModelConfig`, whatever its kind.

``build_network(config)``: kind ``"sr3"`` is the diffusion :class:`~emdiffuse.models.unet.UNet`
itself (state-dict keys as the reference's); kind ``"residual"`` is a
:class:`MeanResidualNet` holding the mean network (keys ``mean.*``) and the residual
diffusion UNet (keys ``residual.*``) — one module, so one EMA, one optimizer and one
checkpoint cover both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from emdiffuse.models.diffusion import q_sample
from emdiffuse.models.mean_net import ErrorNet, MeanUNet
from emdiffuse.models.normalization import condition_from_model, from_model
from emdiffuse.models.unet import UNet
from emdiffuse.models.variants import ModelConfig


def baseline_weights(config: ModelConfig) -> list[list[float]]:
    """``(out_slices, in_slices)`` weights of what the input alone gives on the output grid:
    the (noisy or upsampled) image itself, or linear interpolation between the two bounding
    slices (isotropic); context slices get weight 0. The mean network's skip starts there
    with ``--mean-init input``."""
    k, c = config.k, config.z_context
    if not config.isotropic:
        return [[0.0] * c + [1.0] + [0.0] * c]
    return [[0.0] * c + [1.0 - j / k, j / k] + [0.0] * c for j in range(1, k)]


def baseline_affine(config: ModelConfig) -> tuple[float, float]:
    """``(gain, offset)`` that carry the condition's model space to the target's: the input
    maps to model space with the condition range and the output back with the target range,
    so "the output is the input" in raw units is ``gain * cond + offset`` in model space
    (``(1, 0)`` when the two ranges are one)."""
    cond, target = condition_from_model(config), from_model(config)
    gain = cond.half_range / target.half_range
    offset = (cond.half_range + cond.low - target.low) / target.half_range - 1.0
    return gain, offset


class MeanResidualNet(nn.Module):
    """Mean plus residual: ``mean(cond)`` is the posterior-mean estimate (model space);
    ``residual`` is the diffusion UNet over ``cat([cond, mean, r_t])`` with
    ``r = (x0 - mean) / scale``.

    With ``mean_net.error_channels`` > 0 it also holds an error head (``error``, keys
    ``error.*``; :class:`~emdiffuse.models.mean_net.ErrorNet`): ``log σ²`` of the mean's
    error from ``cat([cond, mean])``.

    ``forward(cond)`` returns the mean; ``forward(cond, x0, noise, noise_level)`` (training)
    returns ``(mean, prediction, r, log_variance)``: the mean (with gradients), the residual
    UNet's prediction at ``r_t = q_sample(r, noise_level, noise)``, the residual ``r`` it is
    trained on, built from the mean *detached* (the diffusion loss does not move the mean
    network), and the error head's ``log σ²`` of every sample (None without a head), also
    from the detached mean. ``x0``, ``noise`` and ``noise_level`` may cover only the first
    ``k`` samples of ``cond``: the mean is computed for all of them and the residual for
    those ``k`` (a cheaper step). One ``forward`` per step, so DDP sees every network in one
    call.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.scale = float(config.residual_scale)
        self.mean = MeanUNet(config.mean_net)
        self.residual = UNet(config.unet)
        m = config.mean_net
        self.error = (
            ErrorNet(m.dims, m.in_channels + m.out_channels, m.out_channels, m.error_channels,
                     m.error_dilations)
            if m.error_channels else None
        )

    @property
    def multiple(self) -> int:
        return math.lcm(self.mean.multiple, self.residual.multiple)

    def parts(self) -> list[nn.Module]:
        """The networks that each learn from their own loss term — the mean network, the
        residual network and the error head if there is one — together every parameter:
        training clips their gradients each on its own."""
        return [m for m in (self.mean, self.residual, self.error) if m is not None]

    def forward(
        self,
        cond: torch.Tensor,
        x0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
    ):
        mean = self.mean(cond)
        if x0 is None:
            return mean
        log_variance = None if self.error is None else self.error(cond, mean.detach())
        k = x0.shape[0]
        cond, m = cond[:k], mean[:k].detach()
        r = (x0 - m) / self.scale
        r_t = q_sample(r, noise_level, noise)
        pred = self.residual(torch.cat([cond, m.to(cond.dtype), r_t.to(cond.dtype)], dim=1),
                             noise_level)  # fmt: skip
        return mean, pred, r, log_variance


def build_network(config: ModelConfig) -> nn.Module:
    """The (randomly initialised) network of ``config``: a UNet, or a MeanResidualNet whose
    mean network's skip starts at :func:`baseline_weights` carried into the target's model
    space (:func:`baseline_affine`): an unbiased first estimate whatever the two ranges. Seed torch first for a
    reproducible initialisation."""
    if not config.residual:
        return UNet(config.unet)
    net = MeanResidualNet(config)
    gain, offset = baseline_affine(config)
    weights = [[gain * w for w in row] for row in baseline_weights(config)]
    net.mean.init_skip(weights, bias=offset)
    return net


__all__ = ["MeanResidualNet", "build_network", "baseline_weights", "baseline_affine"]
