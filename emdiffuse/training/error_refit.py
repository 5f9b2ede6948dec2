"""The error head refitted to the final mean network at the end of training.

During training the error head (:class:`~emdiffuse.models.mean_net.ErrorNet`) learns the
squared errors of the live mean network, which changes at every step, and the checkpoint
keeps the EMA of both. The saved mean (the EMA of the weights, its batch-norm statistics
re-estimated) errs less than the live one and in other places, so its own errors are
ranked by a head that learned someone else's. A few hundred more steps of the head alone,
on training batches, against the final mean's errors, fix that: the same Gaussian
likelihood as in training (:func:`~emdiffuse.models.diffusion.error_nll`), the mean fixed
in eval mode, the head starting from its EMA weights.

Measured on the same models before and after (FlyEM, twenty-eighth session;
``benchmarks/quality/error_ranking.py``): the 16² block Spearman of the head's σ against
the held-out |error| goes from 0.42 to 0.46 at 8 e⁻/px and to 0.48 at super-resolution ×4
after 350 steps (what the last 5 % of a 2.5-min CPU run buys), to 0.47 and 0.51 after
2000; a 20-min super-resolution model's from 0.44 to 0.55. At 2 e⁻/px it stays at 0.43:
the input holds too little about where the error will be. The batches are read without
augmentation: through the training's intensity jitter the refit made the ranking worse.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.diffusion import error_nll
from emdiffuse.models.variants import ModelConfig

# the refit's learning rate (Adam): the head is small and starts close; measured at 2e-3
REFIT_LR = 2e-3
# distinct training batches the refit cycles through (each read, and its mean computed, once)
REFIT_BATCHES = 64
# the first key of the refit's training batches (the loop's keys count up from 0)
REFIT_KEY = 1 << 40


@dataclass(frozen=True)
class RefitRecord:
    """What a refit did: its steps, batches, seconds, and the mean error likelihood of its
    first and last tenth of steps (lower is better)."""

    steps: int
    batches: int
    seconds: float
    nll_first: float
    nll_last: float


def refit_error_head(
    model: torch.nn.Module,
    dataset: Any,
    config: ModelConfig,
    *,
    batch_size: int,
    steps: int,
    device: torch.device,
    autocast: torch.dtype | None,
    deadline: float | None = None,
    grad_clip: float = 1.0,
) -> RefitRecord | None:
    """Train ``model.error`` (a :class:`~emdiffuse.models.networks.MeanResidualNet`'s head,
    in place) for ``steps`` more steps against the errors of ``model.mean`` as it is now
    (eval mode, not changed), on up to :data:`REFIT_BATCHES` training batches of
    ``dataset`` read without augmentation (data as a user gives it: the intensity jitter
    moves the errors the head should rank) and cycled. ``deadline``: a
    ``time.perf_counter()`` value at which it stops early. None (nothing done) for a model
    without an error head or ``steps`` 0."""
    head = getattr(model, "error", None)
    if head is None or steps < 1:
        return None
    mean_net = model.mean
    was_training = mean_net.training
    mean_net.eval()
    trained = copy.deepcopy(head).float().train().requires_grad_(True)
    optimizer = torch.optim.Adam(trained.parameters(), REFIT_LR)
    cast = dict(device_type=device.type, dtype=autocast or torch.bfloat16,
                enabled=autocast is not None)  # fmt: skip
    batches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    losses: list[float] = []
    started = time.perf_counter()
    try:
        for step in range(steps):
            if deadline is not None and time.perf_counter() >= deadline:
                break
            index = step % REFIT_BATCHES
            if index not in batches:
                batches[index] = _fixed_batch(mean_net, dataset, config, index, batch_size,
                                              device, cast)  # fmt: skip
            cond, mean, error = batches[index]
            with torch.autocast(**cast):
                log_variance = trained(cond, mean)
            loss = error_nll(log_variance, error)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        mean_net.train(was_training)
    seconds = time.perf_counter() - started
    if not losses:
        return RefitRecord(0, 0, seconds, float("nan"), float("nan"))
    with torch.no_grad():
        for kept, new in zip(head.parameters(), trained.parameters(), strict=True):
            kept.copy_(new.to(kept.dtype))
    tenth = max(len(losses) // 10, 1)
    return RefitRecord(len(losses), len(batches), seconds, sum(losses[:tenth]) / tenth,
                       sum(losses[-tenth:]) / tenth)  # fmt: skip


def _fixed_batch(mean_net, dataset, config, index, batch_size, device, cast):
    """Training batch ``index`` of the refit, unaugmented: ``(condition on the output grid,
    the mean network's output, its error)``, float32 on ``device``."""
    first = REFIT_KEY + index * batch_size
    batch = dataset.batch(range(first, first + batch_size), split="train", augment=False)
    cond = upsample_xy(batch["cond"].to(device), config.xy_scale, config.cond_upsample)
    with torch.no_grad(), torch.autocast(**cast):
        mean = mean_net(cond).float()
    return cond.float(), mean, batch["target"].to(device).float() - mean


__all__ = ["REFIT_BATCHES", "REFIT_LR", "RefitRecord", "refit_error_head"]
