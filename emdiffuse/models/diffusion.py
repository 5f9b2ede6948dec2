"""Diffusion core: noise schedules, prediction targets, the training objective, the denoiser.

The moving average of the weights is :mod:`emdiffuse.models.ema`.

Conventions (those of the reference EMDiffuse / Palette code):

* ``alpha_bar`` (the reference's ``gamma``) is the cumulative product of ``1 - beta``; a noisy
  target is ``x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps``.
* The network is called as ``net(cat([cond, x_t], 1), noise_level, index)`` with
  ``noise_level = alpha_bar`` of ``x_t``, shape (B,). The reference feeds its ``sample_gammas``
  (a value of ``gammas``, i.e. alpha-bar, despite the ``sqrt_`` variable names) to the network.
* Training draws ``alpha_bar`` continuously: an integer step ``t`` uniform in ``1..T-1``, then
  ``alpha_bar`` uniform between the schedule's points ``t - 1`` and ``t`` (as the reference), so
  any inference schedule and step count are valid at run time.
* Continuous time ``t`` in [0, 1]: ``alpha_bar(0) = 1`` (clean), ``alpha_bar(1)`` = the last
  training point (noisiest); between schedule points ``log(alpha_bar)`` is interpolated linearly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.config_fields import SCHEDULE_KINDS
from emdiffuse.models.sampler_names import SPACING_NAMES
from emdiffuse.models.variants import LOSSES, PREDICTIONS

Denoiser = Callable[[torch.Tensor, "float | torch.Tensor"], torch.Tensor]


# --------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """A noise schedule of ``steps`` discrete alpha-bar values, continuous in between (a
    model's training schedule, or the inference schedule its sampling walks).

    ``kind="linear"``: betas linear from ``beta_start`` to ``beta_end`` (the reference trains with
    2000 steps, 1e-6 .. 1e-2). ``kind="cosine"``: Nichol & Dhariwal, offset ``s``, betas capped at
    0.999.
    """

    kind: str = "linear"
    steps: int = 2000
    beta_start: float = 1e-6
    beta_end: float = 1e-2
    s: float = 0.008

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise InputError(
                f"schedule kind {self.kind!r} unknown; choose one of {', '.join(SCHEDULE_KINDS)}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise InputError(f"schedule steps {self.steps!r} must be an integer >= 2")
        if self.kind == "linear" and not (0 < self.beta_start < self.beta_end < 1):
            raise InputError(
                f"linear schedule needs 0 < beta_start < beta_end < 1, got "
                f"{self.beta_start!r}, {self.beta_end!r}"
            )

    # ---- JSON round trip (the checkpoint config's "schedule" object) ----
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Schedule:
        """From ``{"kind", "steps", "beta_start", "beta_end"}`` (linear) or ``{"kind", "steps", "s"}``."""
        known = {"kind", "steps", "beta_start", "beta_end", "s"}
        unknown = set(spec) - known
        if unknown:
            raise InputError(f"schedule: unknown fields {sorted(unknown)}; allowed {sorted(known)}")
        return cls(**dict(spec))

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "linear":
            return {"kind": "linear", "steps": self.steps, "beta_start": self.beta_start,
                    "beta_end": self.beta_end}  # fmt: skip
        return {"kind": "cosine", "steps": self.steps, "s": self.s}

    # ---- the discrete schedule ----
    @property
    def alpha_bars(self) -> torch.Tensor:
        """(steps,) float64, descending: the reference's ``gammas`` (index 0 least noisy)."""
        if self.kind == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, self.steps, dtype=torch.float64)
        else:
            t = torch.arange(self.steps + 1, dtype=torch.float64) / self.steps
            f = torch.cos((t + self.s) / (1 + self.s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, dim=0)

    def _grid(self) -> torch.Tensor:
        """(steps + 1,) log alpha-bar at t = k / steps, k = 0..steps (t = 0 is clean)."""
        ab = self.alpha_bars
        return torch.cat([torch.zeros(1, dtype=torch.float64), ab.log()])

    def alpha_bar(self, t: float | torch.Tensor) -> torch.Tensor:
        """Alpha-bar at continuous time ``t`` in [0, 1] (float64 tensor, shape of ``t``)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < 0) | (t > 1)).any()):
            raise InputError("schedule time t must lie in [0, 1]")
        grid = self._grid()
        pos = t * self.steps
        lo = pos.floor().clamp(max=self.steps - 1).long()
        frac = pos - lo
        return torch.exp(grid[lo] + frac * (grid[lo + 1] - grid[lo]))

    def timesteps(
        self, n_steps: int, spacing: str = "time", noisiest: float | None = None
    ) -> torch.Tensor:
        """(n_steps + 1,) float64 alpha-bar values of an n-step inference schedule.

        Starts at the noisiest training level, ascends (less noise) and ends at 1.0 (clean).
        ``spacing``: ``"time"`` — uniform in the schedule's time (with ``n_steps == steps`` the
        points are exactly the training schedule's; the reference's choice); ``"logsnr"`` —
        uniform in log-SNR from the noisiest to the least noisy training point, that last point
        replaced by clean;
        ``"karras"`` — Karras et al. rho = 7 spacing of sigma = sqrt((1 - a) / a), likewise.
        The few-step samplers do much better with ``"logsnr"`` or ``"karras"``.
        ``noisiest`` (``logsnr``/``karras`` only): start there instead where it is less noisy
        than the schedule's noisiest point — an inference schedule that reaches far below any
        training level (the reference's test schedule: 6.6e-21) would otherwise spend most of
        a few-step budget where the input has no signal left.
        """
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise InputError(f"steps {n_steps!r} must be an integer >= 1")
        if spacing not in SPACING_NAMES:
            raise InputError(
                f"spacing {spacing!r} unknown; choose one of {', '.join(SPACING_NAMES)}"
            )
        if spacing == "time" and n_steps == self.steps:
            # the schedule's own points, exactly (the reference's loop walks these)
            return torch.cat([self.alpha_bars.flip(0), torch.ones(1, dtype=torch.float64)])
        if spacing == "time":
            out = self.alpha_bar(torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64))
            out[-1] = 1.0
            return out
        ab = self.alpha_bars
        hi, lo = float(ab[-1]), float(ab[0])  # noisiest, cleanest
        if noisiest is not None:
            hi = min(max(hi, float(noisiest)), lo * (1 - 1e-6))
        if spacing == "logsnr":
            lam = torch.linspace(math.log(hi / (1 - hi)), math.log(lo / (1 - lo)), n_steps + 1,
                                 dtype=torch.float64)  # fmt: skip
            a = torch.sigmoid(lam)
        else:
            rho = 7.0
            smax, smin = math.sqrt((1 - hi) / hi), math.sqrt((1 - lo) / lo)
            r = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
            sig = (smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            a = 1 / (1 + sig**2)
        a[0], a[-1] = hi, 1.0
        return a

    def sample_noise_level(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        u: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(batch,) float32 alpha-bar drawn as the reference: step ``t`` uniform in 1..steps-1,
        then uniform between ``alpha_bars[t-1]`` and ``alpha_bars[t]``.

        ``u`` (batch,) uniforms in [0, 1) give the draw explicitly (one uniform carries both the
        step and the position inside it); otherwise they come from ``generator``.
        """
        if u is None:
            u = torch.rand(batch, generator=generator, dtype=torch.float64)
        u = torch.as_tensor(u, dtype=torch.float64).reshape(-1).cpu()
        if u.numel() != batch:
            raise InputError(f"u has {u.numel()} values for a batch of {batch}")
        ab = self.alpha_bars
        pos = u.clamp(0, 1 - 1e-12) * (self.steps - 1)
        k = pos.floor().long() + 1
        frac = pos - pos.floor()
        levels = ab[k - 1] + frac * (ab[k] - ab[k - 1])
        return levels.to(device=device, dtype=torch.float32)


def as_schedule(schedule: Schedule | Mapping[str, Any]) -> Schedule:
    """A :class:`Schedule` from itself or from its dict."""
    return schedule if isinstance(schedule, Schedule) else Schedule.from_dict(schedule)


# --------------------------------------------------------------------------------------
# prediction targets
# --------------------------------------------------------------------------------------
def _check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise InputError(f"prediction {kind!r} unknown; choose one of {', '.join(PREDICTIONS)}")


def _coefs(
    alpha_bar: float | torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar), sqrt(1 - alpha_bar) shaped to broadcast against ``like`` (B, C, ...)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64, device=like.device)
    if a.ndim == 1:
        a = a.reshape(-1, *([1] * (like.ndim - 1)))
    return a.sqrt().to(like.dtype), (1 - a).clamp(min=0).sqrt().to(like.dtype)


def q_sample(x0: torch.Tensor, alpha_bar, noise: torch.Tensor) -> torch.Tensor:
    """``sqrt(a) x0 + sqrt(1 - a) eps``."""
    sa, sb = _coefs(alpha_bar, x0)
    return sa * x0 + sb * noise


def target_for(x0: torch.Tensor, noise: torch.Tensor, alpha_bar, kind: str) -> torch.Tensor:
    """The regression target of prediction ``kind`` (eps, x0 or v = sqrt(a) eps - sqrt(1-a) x0)."""
    _check_prediction(kind)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    sa, sb = _coefs(alpha_bar, x0)
    return sa * noise - sb * x0


def to_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar, kind: str) -> torch.Tensor:
    """The network output ``pred`` of kind ``kind`` converted to an x0 estimate."""
    _check_prediction(kind)
    if kind == "x0":
        return pred
    sa, sb = _coefs(alpha_bar, x_t)
    if kind == "eps":
        return (x_t - sb * pred) / sa
    return sa * x_t - sb * pred


def to_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar, kind: str) -> torch.Tensor:
    """The network output ``pred`` of kind ``kind`` converted to a noise estimate."""
    _check_prediction(kind)
    if kind == "eps":
        return pred
    sa, sb = _coefs(alpha_bar, x_t)
    if kind == "x0":
        return (x_t - sa * pred) / sb
    return sb * x_t + sa * pred


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Noise implied by ``x_t`` and an x0 estimate."""
    return to_eps(x0, x_t, alpha_bar, "x0")


# --------------------------------------------------------------------------------------
# objective
# --------------------------------------------------------------------------------------
def diffusion_loss(
    net: Callable[..., torch.Tensor],
    cond: torch.Tensor,
    x0: torch.Tensor,
    schedule: Schedule | Mapping[str, Any],
    prediction: str = "eps",
    loss: str = "mse",
    *,
    index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean training loss of ``net`` on one batch (scalar tensor).

    ``cond`` (B, Cc, ...) and ``x0`` (B, C, ...) in model space. The noise and the uniforms that
    pick each sample's noise level may be given (``noise``, ``u``) — the trainer keys them on
    global sample ids — else they are drawn from ``generator``.
    """
    _check_prediction(prediction)
    _check_loss("loss", loss)
    schedule = as_schedule(schedule)
    b = x0.shape[0]
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    levels = schedule.sample_noise_level(b, generator, u=u, device=x0.device)
    x_t = q_sample(x0, levels, noise)
    pred = net(torch.cat([cond, x_t], dim=1), levels, index)
    target = target_for(x0, noise, levels, prediction)
    return _pointwise(loss, pred, target)


def residual_loss(
    model: Callable[..., Any],
    cond: torch.Tensor,
    x0: torch.Tensor,
    schedule: Schedule | Mapping[str, Any],
    prediction: str = "v",
    loss: str = "mse",
    mean_loss: str = "mse",
    *,
    mean_ssim: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    residual_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss of a mean-plus-residual model (:class:`~emdiffuse.models.networks.
    MeanResidualNet`, or DDP around one): ``(total, mean part)``.

    total = ``mean_loss``(mean, x0) (+ ``mean_ssim`` x :func:`ssim_loss`) + ``loss``(
    prediction, target of the residual ``r = (x0 - mean.detach()) / scale`` at a noise level
    drawn as :func:`diffusion_loss` does), + :func:`error_nll` of the mean's error under the
    error head's variances when the model has one. The networks learn in the same step;
    neither the residual branch nor the error head moves the mean.
    With ``residual_rows`` = k the residual term covers the first k samples only (the mean
    term all of them): a step that costs less where the residual network is the dearer one.
    """
    _check_prediction(prediction)
    _check_loss("loss", loss)
    _check_loss("mean_loss", mean_loss)
    schedule = as_schedule(schedule)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    levels = schedule.sample_noise_level(x0.shape[0], generator, u=u, device=x0.device)
    k = x0.shape[0] if residual_rows is None else residual_rows
    if not 1 <= k <= x0.shape[0]:
        raise InputError(f"residual_rows must be in 1..{x0.shape[0]} (the batch), got {k}")
    noise, levels = noise[:k], levels[:k]
    mean, pred, r, log_variance = model(cond, x0[:k], noise, levels)
    target = target_for(r.float(), noise.float(), levels, prediction)
    part_mean = _mean_part(mean_loss, mean_ssim, mean, x0)
    total = part_mean + _pointwise(loss, pred, target)
    if log_variance is not None:
        total = total + error_nll(log_variance, x0 - mean.detach())
    return total, part_mean.detach()


def error_nll(log_variance: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """The Gaussian negative log-likelihood (without its constant) of ``error`` under
    per-voxel variances ``exp(log_variance)`` (the error head's, already clamped to a
    finite range): what trains the error head."""
    lv = log_variance.float()
    return 0.5 * (lv + error.float() ** 2 * torch.exp(-lv)).mean()


def mean_loss_only(
    model: Callable[..., Any],
    cond: torch.Tensor,
    x0: torch.Tensor,
    mean_loss: str = "mse",
    *,
    mean_ssim: float = 0.0,
) -> torch.Tensor:
    """The mean part of :func:`residual_loss` alone: ``mean_loss``(model(cond), x0) (+
    ``mean_ssim`` x :func:`ssim_loss`), one evaluation of the mean network and none of the
    residual network (a mean-only warm-up)."""
    _check_loss("mean_loss", mean_loss)
    return _mean_part(mean_loss, mean_ssim, model(cond), x0)


def ssim_loss(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the mean SSIM of ``estimate`` against ``target``, both in model space [-1, 1]:
    as :func:`emdiffuse.metrics.ssim` scores an output, i.e. on the [0, 1] scale (data range
    1), Gaussian window (sigma 1.5, 11 voxels) over the valid region, image by image over
    the last two axes (a 3-D patch slice by slice). Computed in float32 (also under
    autocast); differentiable.

    The five local moments come from one separable Gaussian filtering of the stacked maps
    over the valid region only (``kornia.metrics.ssim`` filters each of them on its own,
    padded, then crops: the same values, and the term added 11.9 ms to a training step of
    the demo's recipe on CPU against 8.1 ms, ``benchmarks/results/train_step.md``)."""
    # only runs that use the term pay for these imports
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d  # noqa: PLC0415

    from emdiffuse.metrics import GAUSSIAN_SIGMA, GAUSSIAN_WINDOW  # noqa: PLC0415

    if min(estimate.shape[-2:]) < GAUSSIAN_WINDOW:
        raise InputError(
            f"the SSIM term needs images of at least {GAUSSIAN_WINDOW} voxels a side, got "
            f"{tuple(estimate.shape[-2:])}; use a larger patch or mean_ssim 0"
        )
    with torch.autocast(estimate.device.type, enabled=False):
        a = (estimate.float().reshape(-1, 1, *estimate.shape[-2:]) + 1) / 2
        b = (target.float().reshape(-1, 1, *target.shape[-2:]) + 1) / 2
        kernel = get_gaussian_kernel1d(GAUSSIAN_WINDOW, GAUSSIAN_SIGMA, device=a.device)
        moments = filter2d_separable(
            torch.cat([a, b, a * a, b * b, a * b], dim=1), kernel, kernel, padding="valid"
        )
        mu_a, mu_b, aa, bb, ab = moments.unbind(dim=1)
        var_a, var_b, cov = aa - mu_a * mu_a, bb - mu_b * mu_b, ab - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2  # scikit-image's K1, K2 at data range 1
        index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
        )
        return 1 - index.mean()


def _mean_part(
    mean_loss: str, mean_ssim: float, mean: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """The mean network's loss: ``mean_loss`` (pointwise) + ``mean_ssim`` x SSIM's."""
    part = _pointwise(mean_loss, mean, x0)
    if mean_ssim:
        part = part + mean_ssim * ssim_loss(mean, x0)
    return part


_LOSS_FUNCTIONS = {"mse": torch.nn.functional.mse_loss, "l1": torch.nn.functional.l1_loss}


def _check_loss(name: str, value: str) -> None:
    if value not in LOSSES:
        raise InputError(f"{name} {value!r} unknown; choose one of {', '.join(LOSSES)}")


def _pointwise(loss: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean ``loss`` (one of :data:`LOSSES`) between ``a`` and ``b``, in float32."""
    return _LOSS_FUNCTIONS[loss](a.float(), b.float())


def make_denoiser(
    net: Callable[..., torch.Tensor],
    cond: torch.Tensor,
    schedule: Schedule | Mapping[str, Any] | None = None,
    prediction: str = "eps",
    *,
    index: torch.Tensor | None = None,
    clip: bool = True,
    clip_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    centre: bool = False,
) -> Denoiser:
    """The bridge from a network to the samplers: ``denoise(x_t, alpha_bar) -> x0_hat``.

    ``alpha_bar`` is a float or a (B,) tensor. The network output (any dtype, e.g. under the
    caller's autocast) is converted to float32 x0 and, with ``clip`` (the reference's
    ``clip_denoised``), clamped to [-1, 1] — or, with ``clip_range`` ``(low, high)``
    (tensors broadcasting against x0), to that range instead: the residual kind's bounds
    ``((-1 - mean) / s, (1 - mean) / s)``, so that ``mean + s * x0_hat`` stays in [-1, 1].
    ``centre`` (the residual kind) subtracts each sample's and channel's spatial mean from
    x0_hat before clipping: the residual is zero-mean by construction, the mean intensity is
    the mean network's alone. (A residual UNet trained for a few hundred steps beside a mean
    network that is still moving learns residuals with a mean of its own: +2 to +3 % of the
    clean range on the demo's denoiser, for every sampler; benchmarks/results/intensity_bias.md.)
    ``schedule`` is accepted for symmetry and unused.
    """
    _check_prediction(prediction)
    del schedule

    def centred(x0: torch.Tensor) -> torch.Tensor:
        if not centre:
            return x0
        return x0 - x0.mean(dim=tuple(range(2, x0.ndim)), keepdim=True)

    def denoise(x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x_t.device)
        level = a.expand(b) if a.ndim == 0 else a.reshape(b)
        pred = net(torch.cat([cond.to(x_t.dtype), x_t], dim=1), level, index).float()
        x0 = centred(to_x0(pred, x_t.float(), level.double(), prediction))
        if not clip:
            return x0
        if clip_range is not None:
            return torch.maximum(torch.minimum(x0, clip_range[1]), clip_range[0])
        return x0.clamp(-1.0, 1.0)

    return denoise


__all__ = [
    "PREDICTIONS", "LOSSES", "Schedule", "as_schedule", "q_sample", "target_for", "to_x0",
    "to_eps", "eps_from_x0", "diffusion_loss", "residual_loss", "error_nll", "make_denoiser",
]  # fmt: skip
