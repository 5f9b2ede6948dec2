"""What the pipeline calls: a loaded model that enhances a batch of numpy tiles.

:class:`Enhancer` wraps one network (eval mode, EMA weights), its
:class:`~emdiffuse.models.variants.ModelConfig` and a sampler. It knows nothing of Dask or
Zarr: tiles go in and out as numpy float32 in model space [-1, 1] (raw intensities map to it
with :mod:`emdiffuse.models.normalization`, the model's ``config.normalization``). The caller
supplies the
initial noise (and, for stochastic samplers, each step's noise) so that a tile's result is a
function of its global position only.

Shapes (``k`` = scale factor; ``h, w`` the input tile, ``H, W`` the output tile)::

    cond  (B, in_slices, h, w)           input grid, normalised
    noise (B, out_slices, H, W)          output grid: H = h * xy_scale, W = w * xy_scale
    out   (B, out_slices, H, W)          normalised, clamped to [-1, 1]

For 3D networks (``config.dims == 3``) every array has one more spatial axis:
``(B, 1, d, h, w)``; super-resolution upsamples only y and x.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from emdiffuse.errors import InputError
from emdiffuse.models import samplers
from emdiffuse.models.checkpoints import check_state_dict, load_checkpoint
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.device import resolve_device
from emdiffuse.models.diffusion import Schedule, make_denoiser
from emdiffuse.models.sampler_names import resolve_spacing
from emdiffuse.models.unet import UNet
from emdiffuse.models.variants import ModelConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class Enhancer:
    """A model ready to enhance tiles: see the module docstring for shapes."""

    def __init__(
        self,
        config: ModelConfig,
        net: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        channels_last: bool = True,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.autocast_dtype = _resolve_precision(precision, self.device)
        self.precision = precision
        self.net = net.to(self.device).eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.channels_last = bool(channels_last and self.device.type == "cuda" and config.dims == 2)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.schedule = Schedule.from_dict(dict(config.schedule))

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        channels_last: bool = True,
        *,
        expect_task: str | None = None,
        expect_scale_factor: int | None = None,
    ) -> Enhancer:
        """Load a checkpoint (safetensors, or weights-only torch) onto ``device``."""
        config, state_dict = load_checkpoint(
            path, expect_task=expect_task, expect_scale_factor=expect_scale_factor
        )
        return cls.from_config(
            config, state_dict, device=device, precision=precision, channels_last=channels_last
        )

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        *,
        precision: str = "auto",
        channels_last: bool = True,
    ) -> Enhancer:
        """Build the network of ``config``; weights from ``state_dict`` or a seeded random
        initialisation (for tests and demos)."""
        config.validate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = UNet(config.unet)
        if state_dict is not None:
            check_state_dict(config, state_dict)
            net.load_state_dict(state_dict, strict=True)
        return cls(config, net, device=device, precision=precision, channels_last=channels_last)

    # ---- contract ----------------------------------------------------------------------
    @property
    def in_slices(self) -> int:
        return self.config.in_slices

    @property
    def out_slices(self) -> int:
        return self.config.out_slices

    @property
    def xy_scale(self) -> int:
        return self.config.xy_scale

    @property
    def z_scale(self) -> int:
        return self.config.z_scale

    @property
    def net_multiple(self) -> int:
        """The network's total downsampling: its input sides must be multiples of it."""
        multiple = getattr(self.net, "multiple", None)
        if multiple is None:
            multiple = 2 ** (len(self.config.unet.channel_mults) - 1)
        return int(multiple)

    @property
    def multiple(self) -> int:
        """Output-grid tile sides (y, x) must be multiples of this (input sides times
        ``xy_scale`` for super-resolution, so it is also a multiple of ``xy_scale``)."""
        return math.lcm(self.net_multiple, self.xy_scale)

    def output_shape(self, cond_shape: Sequence[int]) -> tuple[int, ...]:
        """The output shape for a ``cond`` batch of ``cond_shape``."""
        b, _, *spatial = cond_shape
        *rest, h, w = spatial
        return (b, self.out_slices, *rest, h * self.xy_scale, w * self.xy_scale)

    # ---- inference ---------------------------------------------------------------------
    def enhance(
        self,
        cond: np.ndarray,
        noise: np.ndarray,
        *,
        sampler: str = "dpmpp_2m",
        steps: int = 8,
        step_noise: Callable[[int], np.ndarray] | None = None,
        index: int | Sequence[int] | None = None,
        eta: float = 0.0,
        spacing: str | None = None,
        callback: samplers.Callback | None = None,
    ) -> np.ndarray:
        """Sample the enhanced tiles for a batch: see the module docstring for shapes.

        ``noise`` is the sampler's starting noise x_T; ``step_noise(i)`` gives step ``i``'s
        noise (same shape as ``noise``) for stochastic samplers (ddpm, the SDE solvers, ddim
        with ``eta > 0``).
        ``spacing`` places the steps (``time``, ``logsnr``, ``karras``; None: the sampler's
        default, see :func:`emdiffuse.models.samplers.sample`).
        ``index`` (isotropic models) restricts the output to these in-between slices (0-based,
        ``0..k-2``). Index-embedding models then run only those (``noise`` has one channel per
        index); output-channel models still take full ``noise`` and return the chosen slices.
        ``callback`` is the samplers' per-step callback (:mod:`emdiffuse.models.samplers`:
        a dict of ``i``, ``x``, ``denoised``, ``alpha_bar``, ``alpha_bar_next``, torch tensors
        on the device, in model space on the output grid); index-embedding models call it once
        per step for each in-between slice, one slice after another.
        """
        spacing = resolve_spacing(sampler, spacing)  # refuses an unknown sampler or spacing
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        indices = self._indices(index)
        n_noise = len(indices) if self.config.use_index_embedding else self.out_slices
        cond_t, noise_t = self._check_inputs(cond, noise, n_noise)
        with torch.inference_mode(), self._autocast():
            cond_t = self._upsample(cond_t)
            if self.config.use_index_embedding:
                outs = [
                    self._sample(
                        cond_t,
                        noise_t[:, j : j + 1],
                        sampler=sampler,
                        steps=int(steps),
                        step_noise=_channel(step_noise, j, self._to_tensor),
                        index=i,
                        eta=eta,
                        spacing=spacing,
                        callback=callback,
                    )
                    for j, i in enumerate(indices)
                ]
                out = torch.cat(outs, dim=1)
            else:
                out = self._sample(
                    cond_t,
                    noise_t,
                    sampler=sampler,
                    steps=int(steps),
                    step_noise=_channel(step_noise, None, self._to_tensor),
                    index=None,
                    eta=eta,
                    spacing=spacing,
                    callback=callback,
                )
                if index is not None:
                    out = out[:, list(indices)]
            out = out.float().clamp(-1.0, 1.0).cpu().numpy()
        return out

    __call__ = enhance

    # ---- helpers -----------------------------------------------------------------------
    def _indices(self, index: int | Sequence[int] | None) -> list[int]:
        n = self.out_slices
        if index is None:
            return list(range(n))
        if not self.config.isotropic:
            raise InputError(f"index is only for isotropic models, not {self.config.variant}")
        indices = [int(index)] if np.isscalar(index) else [int(i) for i in index]
        if not indices or any(not 0 <= i < n for i in indices):
            raise InputError(
                f"index {index!r} out of range: {self.config.describe()} has in-between "
                f"slices 0..{n - 1}"
            )
        return indices

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        # a copy: samplers may work in place, and the caller's arrays are never modified
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).to(self.device)
        if self.channels_last and tensor.ndim == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _check_inputs(
        self, cond: np.ndarray, noise: np.ndarray, n_out: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ndim = self.config.dims + 2
        cond = np.asarray(cond)
        noise = np.asarray(noise)
        layout = "(B, C, h, w)" if ndim == 4 else "(B, C, d, h, w)"
        if cond.ndim != ndim:
            raise InputError(f"cond must be {layout}, got shape {cond.shape}")
        if cond.shape[1] != self.in_slices:
            raise InputError(
                f"cond has {cond.shape[1]} slices but {self.config.describe()} takes "
                f"{self.in_slices}"
            )
        expected = list(self.output_shape(cond.shape))
        expected[1] = n_out
        if tuple(noise.shape) != tuple(expected):
            raise InputError(
                f"noise has shape {noise.shape} but cond {cond.shape} needs {tuple(expected)} "
                f"on the output grid"
            )
        for side in expected[-2:]:
            if side % self.multiple:
                raise InputError(
                    f"output tile side {side} is not a multiple of {self.multiple}; "
                    "choose a tile size that is"
                )
        if ndim == 5 and expected[2] % self.net_multiple:
            raise InputError(
                f"tile depth {expected[2]} is not a multiple of {self.net_multiple}; "
                "choose a tile size that is"
            )
        return self._to_tensor(cond), self._to_tensor(noise)

    def _upsample(self, cond: torch.Tensor) -> torch.Tensor:
        k = self.xy_scale
        if k == 1:
            return cond
        up = upsample_xy(cond, k, self.config.cond_upsample)
        if self.channels_last and up.ndim == 4:
            up = up.contiguous(memory_format=torch.channels_last)
        return up.contiguous() if not self.channels_last else up

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _sample(
        self,
        cond: torch.Tensor,
        x_T: torch.Tensor,
        *,
        sampler: str,
        steps: int,
        step_noise: Callable[[int], torch.Tensor] | None,
        index: int | None,
        eta: float,
        spacing: str,
        callback: samplers.Callback | None,
    ) -> torch.Tensor:
        index_t = None
        if index is not None:
            index_t = torch.full((cond.shape[0],), index, dtype=torch.long, device=self.device)
        denoise = make_denoiser(
            self.net, cond, self.schedule, self.config.prediction, index=index_t
        )
        return samplers.sample(
            denoise,
            x_T,
            self.schedule,
            sampler=sampler,
            steps=steps,
            step_noise=step_noise,
            eta=eta,
            spacing=spacing,
            callback=callback,
        )


def _channel(
    step_noise: Callable[[int], np.ndarray] | None,
    channel: int | None,
    to_tensor: Callable[[np.ndarray], torch.Tensor],
) -> Callable[[int], torch.Tensor] | None:
    """Adapt the caller's numpy step-noise callable to tensors (one channel in index mode)."""
    if step_noise is None:
        return None

    def noise_at(i: int) -> torch.Tensor:
        array = np.asarray(step_noise(i), dtype=np.float32)
        if channel is not None:
            array = array[:, channel : channel + 1]
        return to_tensor(array)

    return noise_at
