"""Building blocks of the UNet, for 2D and 3D alike.

The attribute names (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``,
``norm``, ``qkv``, ``proj_out``, ``op``, ``conv``) and the positions inside each
``nn.Sequential`` are chosen so that the network's ``state_dict`` has the same keys and shapes
as the reference EMDiffuse UNet (Palette / guided-diffusion layout). Keep them that way:
:mod:`emdiffuse.models.reference` imports published weights by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10000.0


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def zeroed(module: nn.Module) -> nn.Module:
    """``module`` with all its parameters set to zero (residual branches start as identity)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` lowered to a divisor of ``channels`` when it does not divide."""
    if channels % groups:
        groups = math.gcd(groups, channels)
    return nn.GroupNorm(groups, channels)


def sinusoidal_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) float -> (B, dim): ``[cos(v * f_i), sin(v * f_i)]``, f_i = 10000^(-i / (dim // 2)).

    The frequencies run from 1 down towards 1/10000; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=values.device) / half
    freqs = torch.exp(-math.log(MAX_PERIOD) * exponents)
    angles = values.reshape(-1, 1).float() * freqs.reshape(1, -1)
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out


def embedding_mlp(dim_in: int, dim_out: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear (parameter keys ``0.*`` and ``2.*``)."""
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))


def resample(x: torch.Tensor, how: str | None) -> torch.Tensor:
    """Nearest 2x upsampling (``"up"``), 2x average pooling (``"down"``) or nothing."""
    if how == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if how == "down":
        pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        return pool(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding (FiLM scale/shift or additive).

    ``updown`` ``"up"``/``"down"`` resamples both branches between the first norm/activation
    and the first convolution (guided-diffusion's ``resblock_updown``).
    """

    def __init__(
        self,
        dims: int,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        *,
        groups: int = 32,
        scale_shift: bool = True,
        updown: str | None = None,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.updown = updown
        self.in_layers = nn.Sequential(
            group_norm(channels, groups),
            nn.SiLU(),
            conv_nd(dims, channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels),
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zeroed(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](resample(h, self.updown))
            x = resample(x, self.updown)
        e = self.emb_layers(emb).to(h.dtype)
        e = e.reshape(*e.shape, *([1] * (h.ndim - 2)))
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (scaled_dot_product_attention).

    ``qkv`` is a 1x1 ``Conv1d`` to 3C channels. ``legacy_order=True`` (the reference's default)
    lays them out head by head, ``[q_h, k_h, v_h]`` for each head h; ``False`` lays out
    ``[q (all heads), k, v]``. Heads are ``num_head_channels`` wide, or ``num_heads`` of them
    when ``num_head_channels`` is -1.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        num_head_channels: int = -1,
        groups: int = 32,
        legacy_order: bool = True,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        elif channels <= num_head_channels:
            heads = 1
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention width {channels} is not a multiple of num_head_channels "
                    f"{num_head_channels}"
                )
            heads = channels // num_head_channels
        if heads < 1 or channels % heads:
            raise ValueError(f"attention width {channels} cannot be split into {heads} heads")
        self.heads = heads
        self.legacy_order = legacy_order
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = x.reshape(b, c, -1)
        n = tokens.shape[-1]
        qkv = self.qkv(self.norm(tokens))
        width = c // self.heads
        if self.legacy_order:
            q, k, v = qkv.reshape(b, self.heads, 3 * width, n).split(width, dim=2)
        else:
            q, k, v = qkv.reshape(b, 3, self.heads, width, n).unbind(dim=1)
        # (b, heads, width, n) -> (b, heads, n, width)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, n)
        return (tokens + self.proj_out(out)).reshape(b, c, *spatial)


class Resample(nn.Module):
    """Plain up/downsampling between levels when ``resblock_updown`` is off.

    Parameter names follow the reference: ``op`` (strided conv) down, ``conv`` up.
    """

    def __init__(self, dims: int, channels: int, how: str, use_conv: bool = True) -> None:
        super().__init__()
        self.how = how
        self.use_conv = use_conv
        if use_conv and how == "down":
            self.op = conv_nd(dims, channels, channels, 3, stride=2, padding=1)
        elif use_conv and how == "up":
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "down":
            return self.op(x) if self.use_conv else resample(x, "down")
        x = resample(x, "up")
        return self.conv(x) if self.use_conv else x


class Stage(nn.Sequential):
    """A sequence of layers; residual blocks also get the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
