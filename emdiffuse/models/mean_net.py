"""The mean network of the mean-plus-residual model: a small regression UNet (CARE-sized).

``MeanUNet(config)(cond) -> mean``: the condition in (on the output grid, model space), the
posterior-mean estimate out, in one evaluation. No noise input, no attention, no
normalisation layers (so a voxel's output depends only on its receptive field, never on the
rest of the tile): per level ``convs`` 3×3 convolutions with SiLU, 2× max-pooling down,
nearest 2× up with a skip connection, a 1×1 output convolution. A learned 1×1 ``skip`` from
the condition to the output carries the input through, and the output convolution starts at
zero, so training starts at the skip's baseline and learns the correction. The caller sets
the skip: to the obvious baseline (the noisy or upsampled image, linear interpolation between
two slices) or, better, to the least-squares per-voxel linear predictor of the training data
(:func:`least_squares_skip`), which at a low dose is a strong shrinkage of the noisy input
rather than the input itself.

Spatial sides must be multiples of ``2 ** depth`` (:attr:`MeanUNet.multiple`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emdiffuse.errors import InputError
from emdiffuse.models.layers import conv_nd


@dataclass
class MeanNetConfig:
    """Architecture of a :class:`MeanUNet` (JSON round trip with ``to_dict`` / ``from_dict``)."""

    dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    depth: int = 2  # downsamplings
    convs: int = 2  # 3x3 convolutions per level

    def __post_init__(self) -> None:
        self.validate()

    @property
    def multiple(self) -> int:
        return 2**self.depth

    def validate(self) -> None:
        if self.dims not in (2, 3):
            raise InputError(f"mean_net config: dims must be 2 or 3, got {self.dims!r}")
        for name in ("in_channels", "out_channels", "base_channels", "convs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"mean_net config: {name} must be a positive integer, got {value!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 0 <= self.depth <= 5:
            raise InputError(f"mean_net config: depth must be an integer in 0..5, got {self.depth!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | MeanNetConfig) -> MeanNetConfig:
        if isinstance(data, MeanNetConfig):
            return data
        if not isinstance(data, Mapping):
            raise InputError("model config: field 'mean_net' must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"model config: unknown mean_net field(s) {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except TypeError as error:
            raise InputError(f"model config: bad 'mean_net' field ({error})") from None


def _block(dims: int, ch_in: int, ch_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [conv_nd(dims, ch_in if i == 0 else ch_out, ch_out, 3, padding=1), nn.SiLU()]
    return nn.Sequential(*layers)


class MeanUNet(nn.Module):
    """The regression UNet; see the module docstring."""

    def __init__(self, config: MeanNetConfig) -> None:
        super().__init__()
        config = MeanNetConfig.from_dict(config)
        self.config = c = config
        widths = [c.base_channels * 2**level for level in range(c.depth + 1)]
        self.down = nn.ModuleList()
        ch = c.in_channels
        for width in widths[:-1]:
            self.down.append(_block(c.dims, ch, width, c.convs))
            ch = width
        self.bottom = _block(c.dims, ch, widths[-1], c.convs)
        self.up = nn.ModuleList()
        for width, below in zip(reversed(widths[:-1]), reversed(widths[1:]), strict=True):
            self.up.append(_block(c.dims, width + below, width, c.convs))
        self.out = conv_nd(c.dims, widths[0], c.out_channels, 1)
        self.skip = conv_nd(c.dims, c.in_channels, c.out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.pool = nn.MaxPool2d(2) if c.dims == 2 else nn.MaxPool3d(2)

    @property
    def multiple(self) -> int:
        return self.config.multiple

    @torch.no_grad()
    def init_skip(
        self, weights: Sequence[Sequence[float]], bias: float | Sequence[float] = 0.0
    ) -> None:
        """Set the 1×1 skip to fixed weights ``(out_channels, in_channels)`` and ``bias``
        (one number for every output channel, or one per channel)."""
        w = torch.as_tensor(weights, dtype=self.skip.weight.dtype)
        self.skip.weight.copy_(w.reshape(self.skip.weight.shape).to(self.skip.weight.device))
        b = torch.as_tensor(bias, dtype=self.skip.bias.dtype).to(self.skip.bias.device)
        self.skip.bias.copy_(b.expand_as(self.skip.bias))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        c = self.config
        if cond.ndim != c.dims + 2 or cond.shape[1] != c.in_channels:
            raise InputError(
                f"mean network expects (B, {c.in_channels}, …) with {c.dims} spatial axes, "
                f"got shape {tuple(cond.shape)}"
            )
        if any(side % c.multiple for side in cond.shape[2:]):
            raise InputError(
                f"mean network input {tuple(cond.shape[2:])} is not a multiple of {c.multiple}"
            )
        skips = []
        h = cond
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottom(h)
        for block in self.up:
            h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(h) + self.skip(cond)


def least_squares_skip(
    cond: torch.Tensor, target: torch.Tensor
) -> tuple[list[list[float]], list[float]]:
    """The per-voxel affine map from condition to target with the least squared error:
    ``(weights (out_channels, in_channels), bias (out_channels,))``.

    ``cond`` (B, C_in, …) and ``target`` (B, C_out, …) on the same grid, in model space. The
    fit has an intercept, so its output's mean equals the target's mean over the patches.
    Solved in float64; a channel without variance gets weight 0 (the lstsq minimum-norm
    solution)."""
    if cond.shape[0] != target.shape[0] or cond.shape[2:] != target.shape[2:]:
        raise InputError(
            f"least_squares_skip: condition {tuple(cond.shape)} and target "
            f"{tuple(target.shape)} are not on the same grid"
        )
    x = cond.detach().double().movedim(1, -1).reshape(-1, cond.shape[1])
    y = target.detach().double().movedim(1, -1).reshape(-1, target.shape[1])
    x_mean, y_mean = x.mean(0), y.mean(0)
    solution = torch.linalg.lstsq(x - x_mean, y - y_mean, driver="gelsd").solution  # (in, out)
    weights = solution.T
    bias = y_mean - weights @ x_mean
    return weights.tolist(), bias.tolist()


__all__ = ["MeanNetConfig", "MeanUNet", "least_squares_skip"]
