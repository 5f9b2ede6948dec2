"""Conditional UNet for diffusion, 2D or 3D from the same code.

``UNet(config)(x, noise_level, index=None)``:

* ``x`` is ``cat([cond, x_t], dim=1)``, shape (B, in_channels, *spatial) with 2 or 3 spatial
  axes (``config.dims``). Every spatial side must be a multiple of ``net.multiple``
  (``2 ** (len(channel_mults) - 1)``).
* ``noise_level`` (B,) float is what the reference feeds its network: its ``gamma``, the
  cumulative product of ``1 - beta`` (often written alpha-bar) at the noise level of ``x_t``.
  It is embedded sinusoidally (``base_channels`` wide), then by an MLP to ``4 * base_channels``.
* ``index`` (B,) long — which in-between slice (vEMDiffuse) — is embedded the same way by a
  second MLP and *concatenated* to the noise embedding, as the reference does. Only with
  ``use_index_embedding``.

Architecture and parameter names follow the reference EMDiffuse UNet (itself Palette /
guided-diffusion): the ``state_dict`` keys and shapes are the reference's for the same
settings, so its weights load by name (see :mod:`emdiffuse.models.reference`).

``attention_resolutions`` uses the reference's convention: *downsampling factors*, not feature
sizes. ``(1,)`` puts attention at full resolution, ``(4,)`` after two downsamplings. The
middle block always has attention. Note that the published configs ask for ``(16,)`` with
four levels (factors 1, 2, 4, 8), so the published networks have attention only in the middle
block; we reproduce that exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emdiffuse.errors import InputError
from emdiffuse.models.layers import (
    AttentionBlock,
    Resample,
    ResBlock,
    Stage,
    conv_nd,
    embedding_mlp,
    group_norm,
    sinusoidal_embedding,
    zeroed,
)


@dataclass
class UNetConfig:
    """Architecture of a :class:`UNet` (JSON round trip with ``to_dict`` / ``from_dict``).

    ``norm_groups=None`` follows the reference (16 groups when ``base_channels`` is 16, else
    32); any group count is lowered to a divisor of a layer's width where it does not divide.
    ``num_head_channels=-1`` means "use ``num_heads`` heads"; a layer narrower than
    ``num_head_channels`` gets one head (heads own no parameters, so weights are unaffected). ``image_size`` is the training
    patch side (informational, as in the reference). ``num_indices`` bounds the index
    embedding (0 = unbounded); a positive value turns ``use_index_embedding`` on.
    """

    dims: int = 2
    in_channels: int = 2
    out_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    num_head_channels: int = 32
    dropout: float = 0.2
    norm_groups: int | None = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    legacy_attention_order: bool = True
    use_index_embedding: bool = False
    num_indices: int = 0
    image_size: int | None = None

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if self.num_indices:
            self.use_index_embedding = True
        self.validate()

    @property
    def multiple(self) -> int:
        """Total downsampling: spatial sides must be multiples of this."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def groups(self) -> int:
        if self.norm_groups is not None:
            return int(self.norm_groups)
        return 16 if self.base_channels == 16 else 32

    @property
    def emb_channels(self) -> int:
        """Width of the embedding the residual blocks see."""
        width = 4 * self.base_channels
        return 2 * width if self.use_index_embedding else width

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad field."""

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"unet config: {name} must be a positive integer, got {value!r}")

        if self.dims not in (2, 3):
            raise InputError(f"unet config: dims must be 2 or 3, got {self.dims!r}")
        for name in ("in_channels", "out_channels", "base_channels", "num_heads"):
            positive_int(name, getattr(self, name))
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) or (
            self.num_res_blocks < 0
        ):
            raise InputError(f"unet config: num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise InputError(
                f"unet config: channel_mults must be positive integers, got {self.channel_mults}"
            )
        if any(r < 1 for r in self.attention_resolutions):
            raise InputError(
                "unet config: attention_resolutions are downsampling factors (1, 2, 4, ...), "
                f"got {self.attention_resolutions}"
            )
        if self.norm_groups is not None:
            positive_int("norm_groups", self.norm_groups)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"unet config: dropout must be in [0, 1), got {self.dropout}")
        if self.num_indices < 0:
            raise InputError(f"unet config: num_indices must be >= 0, got {self.num_indices}")
        if self.num_head_channels != -1:
            positive_int("num_head_channels", self.num_head_channels)
            for width in self._attention_widths():
                if width > self.num_head_channels and width % self.num_head_channels:
                    raise InputError(
                        f"unet config: attention width {width} is not a multiple of "
                        f"num_head_channels {self.num_head_channels}; change num_head_channels"
                    )
        else:
            for width in self._attention_widths():
                if width % self.num_heads:
                    raise InputError(
                        f"unet config: attention width {width} cannot be split into "
                        f"{self.num_heads} heads; change num_heads"
                    )

    def _attention_widths(self) -> list[int]:
        widths = [self.base_channels * self.channel_mults[-1]]  # middle block
        for level, mult in enumerate(self.channel_mults):
            if 2**level in self.attention_resolutions:
                widths.append(self.base_channels * mult)
        return widths

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["channel_mults"] = list(self.channel_mults)
        out["attention_resolutions"] = list(self.attention_resolutions)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        if not isinstance(data, Mapping):
            raise InputError("unet config: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unet config: unknown field(s) {', '.join(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


class UNet(nn.Module):
    """The conditional UNet; see the module docstring for inputs and conventions."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if isinstance(config, Mapping):
            config = UNetConfig.from_dict(config)
        config.validate()
        self.config = config
        c = config
        dims, base, groups = c.dims, c.base_channels, c.groups
        emb = c.emb_channels

        def res(ch_in: int, ch_out: int | None = None, updown: str | None = None) -> ResBlock:
            return ResBlock(
                dims,
                ch_in,
                emb,
                c.dropout,
                ch_out,
                groups=groups,
                scale_shift=c.use_scale_shift_norm,
                updown=updown,
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=c.num_heads,
                num_head_channels=c.num_head_channels,
                groups=groups,
                legacy_order=c.legacy_attention_order,
            )

        def level_change(ch: int, how: str) -> nn.Module:
            return res(ch, ch, updown=how) if c.resblock_updown else Resample(dims, ch, how)

        self.cond_embed = embedding_mlp(base, 4 * base)
        if c.use_index_embedding:
            self.channel_embed = embedding_mlp(base, 4 * base)

        ch = base * c.channel_mults[0]
        first = ch
        self.input_blocks = nn.ModuleList([Stage(conv_nd(dims, c.in_channels, ch, 3, padding=1))])
        skips = [ch]
        factor = 1
        last = len(c.channel_mults) - 1
        for level, mult in enumerate(c.channel_mults):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, base * mult)]
                ch = base * mult
                if factor in c.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(Stage(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(Stage(level_change(ch, "down")))
                skips.append(ch)
                factor *= 2

        self.middle_block = Stage(res(ch), attn(ch), res(ch))

        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            mult = c.channel_mults[level]
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), base * mult)]
                ch = base * mult
                if factor in c.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == c.num_res_blocks:
                    layers.append(level_change(ch, "up"))
                    factor //= 2
                self.output_blocks.append(Stage(*layers))

        self.out = nn.Sequential(
            group_norm(ch, groups),
            nn.SiLU(),
            zeroed(conv_nd(dims, first, c.out_channels, 3, padding=1)),
        )

    @property
    def multiple(self) -> int:
        """Total downsampling factor: spatial sides must be multiples of it."""
        return self.config.multiple

    def embed(self, noise_level: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding every residual block sees, (B, emb_channels)."""
        base = self.config.base_channels
        emb = self.cond_embed(sinusoidal_embedding(noise_level, base))
        if self.config.use_index_embedding:
            if index is None:
                raise InputError(
                    "this network has an index embedding: pass index (which in-between slice)"
                )
            n = self.config.num_indices
            if n and (int(index.min()) < 0 or int(index.max()) >= n):
                raise InputError(f"index out of range: this network knows indices 0..{n - 1}")
            emb = torch.cat([emb, self.channel_embed(sinusoidal_embedding(index, base))], dim=1)
        elif index is not None:
            raise InputError("index given but this network has no index embedding; pass None")
        return emb

    def forward(
        self, x: torch.Tensor, noise_level: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.config
        if x.ndim != c.dims + 2 or x.shape[1] != c.in_channels:
            raise InputError(
                f"UNet expects input (B, {c.in_channels}, {', '.join(['...'] * c.dims)}) with "
                f"{c.dims} spatial axes, got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(side % c.multiple for side in spatial):
            raise InputError(
                f"UNet input spatial size {spatial} is not a multiple of {c.multiple} "
                f"(the network downsamples {len(c.channel_mults) - 1} times); pad or crop the tile"
            )
        noise_level = torch.as_tensor(noise_level, device=x.device).reshape(-1)
        if noise_level.numel() == 1 and x.shape[0] > 1:
            noise_level = noise_level.expand(x.shape[0])
        if noise_level.numel() != x.shape[0]:
            raise InputError(
                f"noise_level has {noise_level.numel()} values for a batch of {x.shape[0]}"
            )
        if index is not None:
            index = torch.as_tensor(index, device=x.device).reshape(-1)
            if index.numel() == 1 and x.shape[0] > 1:
                index = index.expand(x.shape[0])
        emb = self.embed(noise_level, index)
        skips = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


__all__ = ["UNet", "UNetConfig"]
