"""What the pipeline calls: a loaded model that enhances a batch of numpy tiles.

:class:`Enhancer` wraps one network (eval mode, EMA weights), its
:class:`~emdiffuse.models.variants.ModelConfig` and a sampler. It knows nothing of Dask or
Zarr: tiles go in and out as numpy float32 in model space [-1, 1]. Raw input maps to model
space with the model's condition range (:attr:`Enhancer.condition_normalization`), outputs
back to raw units with its target range (:attr:`Enhancer.normalization`); see
:mod:`emdiffuse.models.normalization`. The caller supplies the initial noise (and, for
stochastic samplers, each step's noise) so that a tile's result is a function of its global
position only.

Three ways to use a model (both kinds, :data:`~emdiffuse.models.variants.KINDS`):

* :meth:`Enhancer.posterior_mean` — one network evaluation, the regression-like estimate
  (``--samples 0``);
* :meth:`Enhancer.sample_parts` — one sample split as (mean, residual), unclamped, for a
  blender that treats the deterministic mean and the zero-mean texture differently;
* :meth:`Enhancer.enhance` — one sample, clamp(mean + residual) to [-1, 1].

Shapes (``k`` = scale factor; ``h, w`` the input tile, ``H, W`` the output tile)::

    cond  (B, in_slices, h, w)           input grid, normalised
    noise (B, out_slices, H, W)          output grid: H = h * xy_scale, W = w * xy_scale
    out   (B, out_slices, H, W)          normalised, clamped to [-1, 1]

For 3D networks (``config.dims == 3``) every array has one more spatial axis:
``(B, 1, d, h, w)``; super-resolution upsamples only y and x.

This module is longer than the project's ~400-line guide on purpose: it is one class whose
three entry points share the input checks, the autocast and both kinds' sampling paths;
split, each half would need the other's private state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from emdiffuse.errors import InputError
from emdiffuse.models import samplers, step_fit
from emdiffuse.models.checkpoints import check_state_dict, load_checkpoint
from emdiffuse.models.compiled import FixedBatch
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.device import autocast_dtype, resolve_device
from emdiffuse.models.diffusion import Schedule, make_denoiser
from emdiffuse.models.networks import build_network
from emdiffuse.models.normalization import Normalization, condition_from_model, from_model
from emdiffuse.models.sampler_names import (
    DEFAULT_SAMPLER,
    FITTED,
    check_start_noise,
    default_sampling,
    start_alpha_bar,
)
from emdiffuse.models.variants import ModelConfig


class Enhancer:
    """A model ready to enhance tiles: see the module docstring for shapes."""

    def __init__(
        self,
        config: ModelConfig,
        net: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.precision = precision
        self.net = net.to(self.device).eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        # channels_last (CUDA, 2D only) is off by default: on an H200 it made the reference
        # UNet 1.2-1.3x slower eager in bf16 and fp32 at batch 8-64, and changed nothing
        # compiled (benchmarks/results/gpu.md)
        self.channels_last = bool(channels_last and self.device.type == "cuda" and config.dims == 2)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # the callables that evaluate the network(s): compiled at one batch size per tile
        # shape with ``compile`` (models/compiled.py), else the modules themselves
        self.compile = bool(compile)
        wrap = FixedBatch if self.compile else (lambda module: module)
        if config.residual:
            self._mean_net, self._residual_net = wrap(self.net.mean), wrap(self.net.residual)
            self._networks = (self._mean_net, self._residual_net)
            self._error_net = None if self.net.error is None else wrap(self.net.error)
            if self._error_net is not None:
                self._networks += (self._error_net,)
        else:
            self._sr3_net = wrap(self.net)
            self._networks = (self._sr3_net,)
            self._error_net = None
        # sampling walks the stored inference schedule (imported reference weights: the
        # reference's test schedule), else the training schedule; the network is fed the
        # alpha-bar of each point either way, as the reference feeds its gammas
        self.schedule = Schedule.from_dict(config.sampling_schedule)
        # few-step spacings (logsnr, karras) start no noisier than the training schedule's
        # noisiest level: below it the input holds no signal the network was trained on
        self.noisiest = (
            None if config.inference_schedule is None
            else float(Schedule.from_dict(dict(config.schedule)).alpha_bars[-1])
        )

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        channels_last: bool = False,
        *,
        expect_task: str | None = None,
        expect_scale_factor: int | None = None,
        compile: bool = False,
    ) -> Enhancer:
        """Load a checkpoint (safetensors, or weights-only torch) onto ``device``."""
        config, state_dict = load_checkpoint(
            path, expect_task=expect_task, expect_scale_factor=expect_scale_factor
        )
        return cls.from_config(config, state_dict, device=device, precision=precision,
                               channels_last=channels_last, compile=compile)  # fmt: skip

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        *,
        precision: str = "auto",
        channels_last: bool = False,
        compile: bool = False,
    ) -> Enhancer:
        """Build the network of ``config``; weights from ``state_dict`` or a seeded random
        initialisation (for tests and demos). ``compile``: evaluate it through
        ``torch.compile`` (:class:`~emdiffuse.models.compiled.FixedBatch`)."""
        config.validate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_network(config)
        if state_dict is not None:
            check_state_dict(config, state_dict)
            net.load_state_dict(state_dict, strict=True)
        return cls(config, net, device=device, precision=precision, channels_last=channels_last,
                   compile=compile)  # fmt: skip

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
        return int(getattr(self.net, "multiple", self.config.multiple))

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

    @property
    def kind(self) -> str:
        """``"sr3"`` or ``"residual"`` (mean plus residual): see :class:`ModelConfig`."""
        return self.config.kind

    @property
    def condition_normalization(self) -> Normalization:
        """Raw input -> model space for ``cond`` (the model's condition range)."""
        return condition_from_model(self.config)

    @property
    def normalization(self) -> Normalization:
        """Model space -> raw units for the outputs (the model's target range)."""
        return from_model(self.config)

    def reserve_batch(self, n: int) -> None:
        """With ``compile``: pad every batch to at least ``n`` tiles, so that the network is
        compiled once, at the run's batch size (nothing to do otherwise)."""
        for network in self._networks:
            if isinstance(network, FixedBatch):
                network.reserve(n)

    # ---- inference ---------------------------------------------------------------------
    def posterior_mean(self, cond: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """The posterior-mean estimate of a batch in one network evaluation, model space,
        (B, out_slices, H, W), not clamped.

        Residual kind: the mean network's output (``noise`` is not needed; if given its shape
        is checked). SR3 kind: the x0 the network predicts at the noisiest level of the
        sampling schedule from ``x_T = noise`` (the first step of every sampler; with
        ε-prediction this estimate is poor — such models have no mean path).
        """
        if self.config.residual:
            if noise is not None:
                self._check_inputs(cond, noise, self.out_slices)
            cond_t = self._check_cond(cond)
        else:
            if noise is None:
                raise InputError("posterior_mean of an sr3 model needs noise (its x_T)")
            n_noise = self.out_slices
            cond_t, noise_t = self._check_inputs(cond, noise, n_noise)
        with torch.inference_mode(), self._autocast():
            cond_t = self._upsample(cond_t)
            if self.config.residual:
                mean = self._mean_net(cond_t).float()
            else:
                level = float(self.schedule.alpha_bars[-1])
                if self.noisiest is not None:  # where the few-step samplers start
                    level = max(level, self.noisiest)
                parts = []
                for j, index in self._passes(list(range(self.out_slices))):
                    x_T = noise_t if j is None else noise_t[:, j : j + 1]
                    parts.append(self._denoiser(cond_t, index)(x_T, level))
                mean = torch.cat(parts, dim=1)
            return mean.float().cpu().numpy()

    @property
    def has_error_head(self) -> bool:
        """Whether the model predicts its mean's error (an error head): then
        :meth:`posterior_mean_and_sigma` works."""
        return self._error_net is not None

    def posterior_mean_and_sigma(self, cond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The posterior mean (as :meth:`posterior_mean`) and the error head's σ of its error,
        both (B, out_slices, H, W) in model space, from one evaluation of the mean network
        and one of the (small) error head. σ is uncalibrated: the checkpoint's
        ``calibration["mean_interval"]`` scales it to interval half-widths
        (:func:`emdiffuse.models.calibration.mean_half_widths`)."""
        if not self.has_error_head:
            raise InputError("this model has no error head (train a new model to get one)")
        cond_t = self._check_cond(cond)
        with torch.inference_mode():
            with self._autocast():
                cond_t = self._upsample(cond_t)
                mean = self._mean_net(cond_t).float()
            # the small head in float32: bf16 would round σ to steps of 1.5 %
            sigma = torch.exp(0.5 * self._error_net(cond_t.float(), mean).float())
            return mean.cpu().numpy(), sigma.cpu().numpy()

    def sample_parts(
        self,
        cond: np.ndarray,
        noise: np.ndarray,
        *,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        step_noise: Callable[[int], np.ndarray] | None = None,
        spacing: str | None = None,
        eta: float = 0.0,
        mean: np.ndarray | None = None,
        callback: samplers.Callback | None = None,
        start_noise: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One sample of a batch split as ``(mean, residual)``, sample = mean + residual,
        both (B, out_slices, H, W) in model space and NOT clamped (clamp after blending).

        Residual kind: ``mean`` is the mean network's output — or the ``mean`` passed in (a
        previous :meth:`posterior_mean` of the same ``cond``, to evaluate it once for several
        samples) — and ``residual`` is ``residual_scale`` × the sampled residual. SR3 kind
        with v or x0 prediction: ``mean`` is the first step's x0 estimate (read through the
        sampler's callback: no extra evaluation) and ``residual`` = sample − mean. SR3 with
        ε-prediction: ``mean`` is the sample and ``residual`` is zero (no mean path). Other
        arguments as :meth:`enhance`.
        """
        mean_t, residual_t, _ = self._run(
            cond, noise, sampler=sampler, steps=steps, step_noise=step_noise, index=None,
            eta=eta, spacing=spacing, callback=callback, mean=mean, start_noise=start_noise,
        )  # fmt: skip
        return mean_t.float().cpu().numpy(), residual_t.float().cpu().numpy()

    def enhance(
        self,
        cond: np.ndarray,
        noise: np.ndarray,
        *,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        step_noise: Callable[[int], np.ndarray] | None = None,
        index: int | Sequence[int] | None = None,
        eta: float = 0.0,
        spacing: str | None = None,
        callback: samplers.Callback | None = None,
        start_noise: float | None = None,
    ) -> np.ndarray:
        """Sample the enhanced tiles for a batch: see the module docstring for shapes.

        ``noise`` is the sampler's starting noise x_T; ``step_noise(i)`` gives step ``i``'s
        noise (same shape as ``noise``) for stochastic samplers (ddpm, the SDE solvers, ddim
        with ``eta > 0``).
        ``spacing`` places the steps (``time``, ``logsnr``, ``karras``; ``fitted``: the
        schedule the model fitted at the end of training for ``sampler`` at ``steps``,
        residual kind, :mod:`emdiffuse.models.step_fit`). ``steps`` and ``spacing`` None are
        the model's defaults (:func:`~emdiffuse.models.sampler_names.default_sampling`): its
        fitted schedule where it has one for ``sampler``, else 8 steps on the sampler's
        default spacing.
        ``start_noise`` (residual kind; ``logsnr``/``karras`` spacing): start the residual's
        sampling at noise level σ = ``start_noise`` instead of the schedule's noisiest, with
        ``noise`` as that state (the residual is scaled to about unit variance, so unit
        noise is its marginal's Gaussian approximation there). A truncated start keeps the
        residual's coarse structure near the mean and leaves the steps the fine texture
        (σ ≈ 1.5–2 at 4 steps: ``benchmarks/results/residual_nfe_start_noise.md``); None:
        a full sample.
        ``index`` (isotropic models) restricts the output to these in-between slices (0-based,
        ``0..k-2``). Index-embedding models then run only those (``noise`` has one channel per
        index); output-channel models still take full ``noise`` and return the chosen slices.
        ``callback`` is the samplers' per-step callback (:mod:`emdiffuse.models.samplers`:
        a dict of ``i``, ``x``, ``denoised``, ``alpha_bar``, ``alpha_bar_next``, torch tensors
        on the device, in model space on the output grid — for the residual kind ``x`` and
        ``denoised`` are mapped from residual space as ``mean + residual_scale * value``);
        index-embedding models call it once per step for each in-between slice, one slice
        after another. Returns clamp(mean + residual, -1, 1) (:meth:`sample_parts`).
        """
        _, _, out = self._run(
            cond, noise, sampler=sampler, steps=steps, step_noise=step_noise, index=index,
            eta=eta, spacing=spacing, callback=callback, mean=None, start_noise=start_noise,
        )  # fmt: skip
        return out.float().clamp(-1.0, 1.0).cpu().numpy()

    __call__ = enhance

    # ---- helpers -----------------------------------------------------------------------
    def _run(
        self,
        cond: np.ndarray,
        noise: np.ndarray,
        *,
        sampler: str,
        steps: int | None,
        step_noise: Callable[[int], np.ndarray] | None,
        index: int | Sequence[int] | None,
        eta: float,
        spacing: str | None,
        callback: samplers.Callback | None,
        mean: np.ndarray | None,
        start_noise: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, residual, sample)`` tensors of one sample (sample computed directly, not
        as mean + residual, so that :meth:`enhance` is exactly the sampler's result)."""
        if steps is not None and (isinstance(steps, bool)
                                  or not isinstance(steps, (int, np.integer)) or steps < 1):
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        # the model's defaults where None; refuses an unknown sampler or spacing
        steps, spacing = default_sampling(sampler, steps, spacing, self.config.step_schedules
                                          if self.config.residual else None, start_noise)  # fmt: skip
        start_noise = check_start_noise(start_noise, spacing)
        if start_noise is not None and not self.config.residual:
            raise InputError(
                f"start_noise is for mean-plus-residual models; {self.config.describe()} is "
                "the sr3 kind, whose sample has no mean to start near"
            )  # fmt: skip
        indices = self._indices(index)
        n_noise = len(indices) if self.config.use_index_embedding else self.out_slices
        cond_t, noise_t = self._check_inputs(cond, noise, n_noise)
        mean_t = None
        if mean is not None:
            if not self.config.residual:
                raise InputError("mean= is for residual-kind models (their mean network)")
            mean_t = self._check_mean(mean, noise_t.shape)
        kw = {"sampler": sampler, "steps": int(steps), "eta": eta, "spacing": spacing}
        if spacing == FITTED:
            kw["alphas"] = self.fitted_alphas(sampler, int(steps))
        noisiest = self.noisiest
        if start_noise is not None:
            noisiest = max(noisiest or 0.0, start_alpha_bar(start_noise))
        with torch.inference_mode(), self._autocast():
            cond_t = self._upsample(cond_t)
            if self.config.residual:
                m, r = self._sample_residual(
                    cond_t, noise_t, mean_t, _channel(step_noise, None, self._to_tensor),
                    callback, {**kw, "noisiest": noisiest},
                )  # fmt: skip
                sample = m + r
            else:
                parts = [
                    self._sample_sr3(
                        cond_t, noise_t if j is None else noise_t[:, j : j + 1], i,
                        _channel(step_noise, j, self._to_tensor), callback, kw,
                    )  # fmt: skip
                    for j, i in self._passes(indices)
                ]
                m = torch.cat([p[0] for p in parts], dim=1)
                sample = torch.cat([p[1] for p in parts], dim=1)
                r = sample - m
            if index is not None and not self.config.use_index_embedding:
                m, r, sample = (t[:, list(indices)] for t in (m, r, sample))
        return m, r, sample

    def _passes(self, indices: list[int]) -> list[tuple[int | None, int | None]]:
        """(noise channel, embedded index) of each network pass: one pass of all channels,
        or (index-embedding models) one per in-between slice."""
        if self.config.use_index_embedding:
            return list(enumerate(indices))
        return [(None, None)]

    def _denoiser(self, cond: torch.Tensor, index: int | None, **kw):
        index_t = None
        if index is not None:
            index_t = torch.full((cond.shape[0],), index, dtype=torch.long, device=self.device)
        return make_denoiser(self._sr3_net, cond, self.schedule, self.config.prediction,
                             index=index_t, **kw)  # fmt: skip

    def _sample_sr3(self, cond, x_T, index, step_noise, callback, kw):
        """(first x0 estimate or the sample, sample) of one SR3 pass."""
        first: list[torch.Tensor] = []

        def capture(info: dict) -> None:
            if info["i"] == 0:
                first.append(info["denoised"].float().clone())
            if callback is not None:
                callback(info)

        denoise = self._denoiser(cond, index)
        sample = samplers.sample(denoise, x_T, self.schedule, step_noise=step_noise,
                                 callback=capture, noisiest=self.noisiest, **kw).float()  # fmt: skip
        if self.config.prediction == "eps" or not first:
            return sample, sample
        return first[0], sample

    def _residual_denoiser(self, cond: torch.Tensor, mean: torch.Tensor) -> samplers.Denoiser:
        """The residual network's ``denoise(x_t, alpha_bar)`` (residual kind, model space
        divided by ``residual_scale``) given the condition and the mean."""
        s = float(self.config.residual_scale)
        bounds = ((-1.0 - mean) / s, (1.0 - mean) / s)
        cond_mean = torch.cat([cond, mean.to(cond.dtype)], dim=1)
        return make_denoiser(self._residual_net, cond_mean, self.schedule, self.config.prediction,
                             clip_range=bounds, centre=True)  # fmt: skip

    def fitted_alphas(self, sampler: str, steps: int) -> torch.Tensor:
        """The model's fitted schedule for ``sampler`` at ``steps`` (spacing ``fitted``)."""
        record = self.config.step_schedules if self.config.residual else None
        return step_fit.fitted_alphas(record, sampler, steps, self.config.describe())

    def fit_step_schedule(self, cond: np.ndarray, noise: np.ndarray, steps: int) -> dict:
        """Fit an n-step :data:`~emdiffuse.models.step_fit.FIT_SAMPLER` schedule on a batch
        of held-out conditions (residual kind; ``noise`` the starting noise, the output's
        shape): :func:`emdiffuse.models.step_fit.fit_sigmas` against the fine solution."""
        if not self.config.residual:
            raise InputError(f"a fitted step schedule is for mean-plus-residual models, not "
                             f"{self.config.describe()}")  # fmt: skip
        cond_t, x_T = self._check_inputs(cond, noise, self.out_slices)
        sampler = samplers.SAMPLERS[step_fit.FIT_SAMPLER]
        with torch.inference_mode(), self._autocast():
            cond_t = self._upsample(cond_t)
            denoise = self._residual_denoiser(cond_t, self._mean_net(cond_t).float())
            fine = self.schedule.timesteps(step_fit.REFERENCE_STEPS, "logsnr", self.noisiest)
            reference = sampler(denoise, x_T, fine)
            start = self.schedule.timesteps(int(steps), "logsnr", self.noisiest)
            return step_fit.fit_sigmas(lambda a: sampler(denoise, x_T, a), start, reference)

    def _sample_residual(self, cond, x_T, mean, step_noise, callback, kw):
        """(mean, residual in model space) of the residual kind."""
        if mean is None:
            mean = self._mean_net(cond).float()
        s = float(self.config.residual_scale)
        denoise = self._residual_denoiser(cond, mean)
        report = None
        if callback is not None:

            def report(info: dict) -> None:
                callback({**info, "x": mean + s * info["x"], "denoised": mean + s * info["denoised"]})

        r = samplers.sample(denoise, x_T, self.schedule, step_noise=step_noise, callback=report,
                            **kw).float()  # fmt: skip
        return mean, s * r

    def _check_mean(self, mean: np.ndarray, shape) -> torch.Tensor:
        mean = np.asarray(mean)
        if tuple(mean.shape) != tuple(shape):
            raise InputError(f"mean has shape {mean.shape}, the output batch is {tuple(shape)}")
        return self._to_tensor(mean)

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

    def _check_cond(self, cond: np.ndarray) -> torch.Tensor:
        """``cond`` checked (layout, slices, tile sides) as a tensor."""
        cond = np.asarray(cond)
        self._check_layout(cond, self.out_slices)
        return self._to_tensor(cond)

    def _check_inputs(
        self, cond: np.ndarray, noise: np.ndarray, n_out: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cond = np.asarray(cond)
        noise = np.asarray(noise)
        expected = self._check_layout(cond, n_out)
        if tuple(noise.shape) != tuple(expected):
            raise InputError(
                f"noise has shape {noise.shape} but cond {cond.shape} needs {tuple(expected)} "
                f"on the output grid"
            )
        return self._to_tensor(cond), self._to_tensor(noise)

    def _check_layout(self, cond: np.ndarray, n_out: int) -> list[int]:
        """Check ``cond``; return the output batch shape with ``n_out`` channels."""
        ndim = self.config.dims + 2
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
        return expected

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
