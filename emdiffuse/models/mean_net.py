"""The mean network of the mean-plus-residual model: a small regression UNet (CARE-sized).

``MeanUNet(config)(cond) -> mean``: the condition in (on the output grid, model space), the
posterior-mean estimate out, in one evaluation. No noise input, no attention, and at
inference no normalisation over space (so a voxel's output depends only on its receptive
field, never on the rest of the tile): per level ``convs`` 3×3 convolutions, each followed
by a norm and SiLU. The norm is one of two. ``batch_norm`` (the presets' choice) normalises
each channel with the batch's statistics in training and with their running averages at
inference: there it is a fixed affine map per channel, whose statistics and output offset
the trainer re-estimates at the end of a run (:mod:`emdiffuse.training.norm_stats`).
``channel_norm`` (:class:`ChannelNorm`) normalises each voxel's features across channels, a
per-voxel layer norm (the seventeenth to twenty-third sessions' models). Then 2×
max-pooling down, nearest 2× up with a skip connection, a 1×1 output convolution. Without a
norm (models made before it, both false) the body could blow up early in training at a
high learning rate and end dead — its last block all-negative under SiLU, its output 0 for
good, the model its linear skip (FlyEM super-resolution ×4 at the reference size: 28.63 dB,
the 1×1 skip's score; with the norm 31.54; benchmarks/quality/READING.md, seventeenth
session).

A learned linear ``skip`` from the condition to the output (a ``skip_size``-wide
convolution, mirrored at the tile's edges; 1×1 by default) carries the input through, and
the output convolution starts at zero, so training starts at the skip's baseline and learns
the correction. The caller sets the skip: to the obvious baseline (the noisy or upsampled
image, linear interpolation between two slices) or, better, to the least-squares linear
predictor of the training data (:func:`least_squares_skip`): per voxel, a strong shrinkage
of the noisy input at a low dose; with a wider skip, the Wiener filter of the training data
(denoising: 18.6 → 25.8 dB on FlyEM at 8 e⁻/px from 1×1 to 7×7; isotropic ×4: 28.1 → 29.1
dB).

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

MAX_SKIP_SIZE = 15  # the widest linear skip (voxels)
# the error head's default dilations of its 3x3 convolutions: a 17-voxel receptive field
ERROR_DILATIONS = (1, 1, 2, 4)
MAX_ERROR_LAYERS = 8  # the error head's most convolutions
MAX_DILATION = 64  # its widest dilation (voxels)


@dataclass
class MeanNetConfig:
    """Architecture of a :class:`MeanUNet` (JSON round trip with ``to_dict`` / ``from_dict``)."""

    dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    depth: int = 2  # downsamplings
    convs: int = 2  # 3x3 convolutions per level
    skip_size: int = 1  # the linear skip's width in voxels (odd)
    channel_norm: bool = False  # a per-voxel norm across channels after each convolution
    batch_norm: bool = False  # batch norm after each convolution (an affine map at inference)
    error_channels: int = 0  # width of the error head (:class:`ErrorNet`); 0: none
    # dilations of the error head's 3x3 convolutions, one per layer (:data:`ERROR_DILATIONS`)
    error_dilations: tuple[int, ...] = ERROR_DILATIONS

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
        errors = self.error_channels
        if isinstance(errors, bool) or not isinstance(errors, int) or errors < 0:
            raise InputError(
                f"mean_net config: error_channels must be an integer >= 0, got {errors!r}"
            )
        given = dilations = self.error_dilations
        if isinstance(dilations, list):  # from JSON
            dilations = self.error_dilations = tuple(dilations)
        if (
            not isinstance(dilations, tuple)
            or not 1 <= len(dilations) <= MAX_ERROR_LAYERS
            or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DILATION
                   for d in dilations)
        ):  # fmt: skip
            raise InputError(
                f"mean_net config: error_dilations must be a list of 1 to {MAX_ERROR_LAYERS} "
                f"integers in 1..{MAX_DILATION}, got {given!r}"
            )
        for name in ("channel_norm", "batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(
                    f"mean_net config: {name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.channel_norm and self.batch_norm:
            raise InputError("mean_net config: channel_norm and batch_norm exclude each other; "
                             "set one")
        size = self.skip_size
        odd = isinstance(size, int) and not isinstance(size, bool) and size % 2 == 1
        if not odd or not 1 <= size <= MAX_SKIP_SIZE:
            raise InputError(
                f"mean_net config: skip_size must be an odd integer in 1..{MAX_SKIP_SIZE}, "
                f"got {size!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["error_dilations"] = list(self.error_dilations)  # JSON has no tuples
        return data

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


class ChannelNorm(nn.Module):
    """Layer norm of each voxel's feature vector (across channels, never across space), with
    a learned per-channel scale and shift: bounds the features at every voxel while keeping
    a voxel's output a function of its receptive field alone."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.movedim(1, -1)
        normed = nn.functional.layer_norm(last, last.shape[-1:], self.weight, self.bias, self.eps)
        return normed.movedim(-1, 1)


def _norm(config: MeanNetConfig, channels: int) -> list[nn.Module]:
    """The norm after a convolution: none, :class:`ChannelNorm`, or batch norm."""
    if config.batch_norm:
        return [(nn.BatchNorm2d if config.dims == 2 else nn.BatchNorm3d)(channels)]
    return [ChannelNorm(channels)] if config.channel_norm else []


def _block(config: MeanNetConfig, ch_in: int, ch_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(config.convs):
        layers.append(conv_nd(config.dims, ch_in if i == 0 else ch_out, ch_out, 3, padding=1))
        layers += [*_norm(config, ch_out), nn.SiLU()]
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
            self.down.append(_block(c, ch, width))
            ch = width
        self.bottom = _block(c, ch, widths[-1])
        self.up = nn.ModuleList()
        for width, below in zip(reversed(widths[:-1]), reversed(widths[1:]), strict=True):
            self.up.append(_block(c, width + below, width))
        self.out = conv_nd(c.dims, widths[0], c.out_channels, 1)
        self.skip = conv_nd(c.dims, c.in_channels, c.out_channels, c.skip_size,
                            padding=c.skip_size // 2,
                            padding_mode="reflect" if c.skip_size > 1 else "zeros")  # fmt: skip
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.pool = nn.MaxPool2d(2) if c.dims == 2 else nn.MaxPool3d(2)

    @property
    def multiple(self) -> int:
        return self.config.multiple

    @torch.no_grad()
    def shift_output(self, offset: torch.Tensor) -> None:
        """Add ``offset`` (one number per output channel, model space) to every output."""
        self.out.bias.add_(offset.to(self.out.bias))

    @torch.no_grad()
    def init_skip(
        self, weights: Sequence[Sequence[float]], bias: float | Sequence[float] = 0.0
    ) -> None:
        """Set the skip to fixed weights and ``bias`` (one number for every output channel, or
        one per channel). ``weights``: the whole kernel ``(out_channels, in_channels,
        *[skip_size] * dims)``, or ``(out_channels, in_channels)`` for its centre tap (the
        other taps 0: a per-voxel map)."""
        w = torch.as_tensor(weights, dtype=self.skip.weight.dtype).to(self.skip.weight.device)
        shape = self.skip.weight.shape
        if w.ndim == 2:
            centre = (slice(None), slice(None)) + (self.config.skip_size // 2,) * self.config.dims
            self.skip.weight.zero_()
            self.skip.weight[centre] = w.reshape(shape[:2])
        else:
            self.skip.weight.copy_(w.reshape(shape))
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


# the head's first estimate of log σ² (model space): σ ≈ 0.14, a typical error at the start
ERROR_START_LOG_VARIANCE = -4.0
# the range its log σ² is clamped to (σ from 5e-5 to 12 model units): a finite
# likelihood at any start, and no overflow when σ is taken
LOG_VARIANCE_RANGE = (-20.0, 5.0)


class ErrorNet(nn.Module):
    """The error head: ``log σ²`` per output voxel of the posterior mean's error, from the
    condition and the mean (both on the output grid, model space).

    A few dilated 3×3 convolutions with SiLU over ``cat([cond, mean])`` (``dilations``: the
    default's receptive field is 17 voxels; no normalisation over space: a voxel's σ
    depends on its neighbourhood alone), a 1×1 output that starts near
    :data:`ERROR_START_LOG_VARIANCE` everywhere. Trained by the Gaussian negative
    log-likelihood of the mean's error with the mean detached
    (:func:`~emdiffuse.models.diffusion.residual_loss`), so it never moves the mean; a
    conformal scale fitted on held-out data turns σ into interval half-widths
    (:func:`~emdiffuse.models.calibration.fit_mean`)."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        channels: int,
        dilations: Sequence[int] = ERROR_DILATIONS,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for dilation in dilations:
            layers += [conv_nd(dims, ch, channels, 3, padding=dilation, dilation=dilation),
                       nn.SiLU()]  # fmt: skip
            ch = channels
        self.body = nn.Sequential(*layers)
        self.out = conv_nd(dims, channels, out_channels, 1)
        # small random weights (not zero: the body then learns from the first step)
        nn.init.normal_(self.out.weight, std=0.1 / channels**0.5)
        nn.init.constant_(self.out.bias, ERROR_START_LOG_VARIANCE)

    def forward(self, cond: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``log σ²`` (B, out_channels, *spatial) of the error of ``mean`` given ``cond``,
        clamped to :data:`LOG_VARIANCE_RANGE`."""
        log_variance = self.out(self.body(torch.cat([cond, mean.to(cond.dtype)], dim=1)))
        return log_variance.clamp(*LOG_VARIANCE_RANGE)


def _windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """Every full ``size``-wide window of ``x`` (C, *spatial) as rows: (positions, C·size^d),
    in the order of a convolution kernel's (in_channel, *spatial) weights."""
    dims = x.ndim - 1
    for axis in range(1, dims + 1):
        x = x.unfold(axis, size, 1)  # (C, n0, …, s0, …)
    x = x.movedim(0, dims)  # (n0, …, C, s0, …)
    return x.reshape(-1, x[(0,) * dims].numel())


def least_squares_skip(
    cond: torch.Tensor, target: torch.Tensor, size: int = 1
) -> tuple[list, list[float]]:
    """The linear map from condition to target, ``size`` voxels wide, with the least squared
    error: ``(weights, bias (out_channels,))``; weights ``(out_channels, in_channels)`` for
    ``size`` 1, else the kernel ``(out_channels, in_channels, *[size] * dims)``.

    ``cond`` (B, C_in, …) and ``target`` (B, C_out, …) on the same grid, in model space; the
    fit uses the voxels whose whole window lies inside the patch. The fit has an intercept, so
    its output's mean equals the target's mean over those voxels. Solved in float64 from the
    normal equations; an input (channel and tap) without variance gets weight 0."""
    if cond.shape[0] != target.shape[0] or cond.shape[2:] != target.shape[2:]:
        raise InputError(
            f"least_squares_skip: condition {tuple(cond.shape)} and target "
            f"{tuple(target.shape)} are not on the same grid"
        )
    r, dims = size // 2, cond.ndim - 2
    if size < 1 or size % 2 == 0 or any(side <= 2 * r for side in cond.shape[2:]):
        raise InputError(
            f"least_squares_skip: size must be odd and smaller than the patch, got {size} "
            f"for patches {tuple(cond.shape[2:])}"
        )
    inner = (slice(None),) + (slice(r, -r if r else None),) * dims
    n, xx, xy, xs, ys = 0, 0.0, 0.0, 0.0, 0.0
    for c, t in zip(cond.detach().double(), target.detach().double(), strict=True):
        x = _windows(c, size)
        y = t[inner].reshape(t.shape[0], -1).T
        n += x.shape[0]
        xx, xy = xx + x.T @ x, xy + x.T @ y
        xs, ys = xs + x.sum(0), ys + y.sum(0)
    x_mean, y_mean = xs / n, ys / n
    cov_xx = xx - n * torch.outer(x_mean, x_mean)
    cov_xy = xy - n * torch.outer(x_mean, y_mean)
    var = cov_xx.diagonal()
    keep = var > 1e-12 * max(float(var.max()), 1e-300)
    solution = torch.zeros_like(cov_xy)  # (in·taps, out)
    if bool(keep.any()):
        solution[keep] = torch.linalg.lstsq(
            cov_xx[keep][:, keep], cov_xy[keep], driver="gelsd"
        ).solution
    weights = solution.T
    bias = y_mean - weights @ x_mean
    if size > 1:
        weights = weights.reshape(target.shape[1], cond.shape[1], *[size] * dims)
    return weights.tolist(), bias.tolist()


def skip_gains(weights) -> list[list[float]]:
    """``(out_channels, in_channels)``: how much of each input channel a skip passes to each
    output channel at zero frequency (the sum of its kernel's taps), rounded to 4 places."""
    w = torch.as_tensor(weights).detach().to(torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)
    return [[round(float(v), 4) for v in row] for row in w]


__all__ = [
    "MeanNetConfig", "MeanUNet", "ErrorNet", "least_squares_skip", "skip_gains", "MAX_SKIP_SIZE",
]  # fmt: skip
