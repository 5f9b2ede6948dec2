"""One optimisation step, and the keyed randomness that makes training exact.

Every random draw of a step is keyed: sample ``key`` of the loader gets its diffusion noise
and noise level from a generator seeded with ``(seed, key)`` (:func:`keyed_noise`), so a
resumed run, a run on several ranks and a single process draw the same numbers. The learning
rate is a pure function of the step and, in a run with a time limit, of the share of it spent
(:func:`lr_at`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from emdiffuse.models import diffusion
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.training.settings import TrainSettings


def lr_at(step: int, s: TrainSettings, time_fraction: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine.

    The cosine runs from the end of the warm-up to ``s.steps``; ``time_fraction`` (the share
    of a time limit already spent, 0 without one) moves it on when time runs out sooner, so
    a run stopped by its time limit ends at the floor too.
    """
    if s.warmup > 0 and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.lr_schedule == "cosine":
        span = max(s.steps - 1 - s.warmup, 1)
        t = min(max((step - s.warmup) / span, time_fraction, 0.0), 1.0)
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return s.lr


def _key_seed(seed: int, key: int, salt: int = 0) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_noise(
    keys: Sequence[int], shape: Sequence[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample diffusion noise (B, *shape) and uniforms (B,) in [0, 1), each a function of
    ``(seed, key)`` only (CPU generators, so the same on any device or rank)."""
    noise, uniforms = [], []
    for key in keys:
        g = torch.Generator().manual_seed(_key_seed(seed, int(key)))
        uniforms.append(torch.rand((), generator=g))
        noise.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(noise), torch.stack(uniforms)


def training_loss(
    net: torch.nn.Module,
    cond: torch.Tensor,
    target: torch.Tensor,
    schedule,
    prediction: str,
    loss: str,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion objective with the noise and noise levels given by the caller."""
    return diffusion.diffusion_loss(
        net, cond, target, schedule, prediction, loss, noise=noise, u=uniforms, index=index
    )


def train_step(
    model, net, optimizer, batch, schedule, config, s: TrainSettings, dev,
    autocast: torch.dtype | None, mean_only: bool = False,
) -> tuple[float, float]:
    """One step on ``batch``: loss, backward (through ``model``, DDP or ``net`` itself),
    gradient clipping and the optimizer step. Returns (loss, gradient norm). ``autocast``:
    the forward pass's autocast dtype (None: fp32; :func:`emdiffuse.models.device.autocast_dtype`).

    A regression run (``s.objective``) puts every sample at the noisiest level, the
    sampler's first step. A residual-kind model (``config.residual``) trains its mean and
    residual networks together (:func:`emdiffuse.models.diffusion.residual_loss`), or with
    ``mean_only`` (its warm-up, :func:`mean_warmup_steps`) the mean network alone; the
    residual network sees the first ``s.residual_batch`` samples of the batch (all if None)."""
    cond = batch["cond"].to(dev, non_blocking=True)
    target = batch["target"].to(dev, non_blocking=True)
    cond = upsample_xy(cond, config.xy_scale, config.cond_upsample)
    noise, uniforms = keyed_noise(batch["key"].tolist(), target.shape[1:], s.seed)
    if s.objective == "regression":
        uniforms = torch.ones_like(uniforms)
    index = batch.get("index")
    if index is not None:
        index = index.to(dev)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(
        device_type=dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
    ):
        if config.residual and mean_only:
            loss = diffusion.mean_loss_only(
                model, cond, target, s.mean_loss, mean_ssim=s.mean_ssim
            )
        elif config.residual:
            loss, _ = diffusion.residual_loss(
                model, cond, target, schedule, config.prediction, config.loss, s.mean_loss,
                mean_ssim=s.mean_ssim, noise=noise.to(dev), u=uniforms.to(dev),
                residual_rows=s.residual_batch,
            )  # fmt: skip
        else:
            loss = training_loss(
                model, cond, target, schedule, config.prediction, config.loss,
                noise.to(dev), uniforms.to(dev), index,
            )  # fmt: skip
    loss.backward()
    grad_norm = clip_gradients(net, s.grad_clip)
    optimizer.step()
    return float(loss.detach()), float(grad_norm)


def mean_warmup_steps(s: TrainSettings) -> int:
    """How many first steps train the mean network alone: ``mean_warmup`` of the run's
    ``steps`` (the loop applies it to residual-kind models only)."""
    return int(s.mean_warmup * s.steps)


def clip_gradients(net: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradient norm to ``max_norm``: of the whole network, or — a mean-plus-residual
    model — of each of its ``parts()`` (mean, residual network, error head) separately: their
    losses differ in scale, and the diffusion loss's gradients must not shrink the mean
    network's steps. Returns the norm over all parameters before clipping."""
    parts = net.parts() if hasattr(net, "parts") else [net]
    norms = [torch.nn.utils.clip_grad_norm_(part.parameters(), max_norm) for part in parts]
    return float(torch.stack([n.float() for n in norms]).pow(2).sum().sqrt())


__all__ = ["lr_at", "keyed_noise", "training_loss", "train_step", "mean_warmup_steps",
           "clip_gradients"]  # fmt: skip
