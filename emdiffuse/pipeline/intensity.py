"""The intensity ranges of a run, fixed once on the client before any chunk runs.

A model has two: the *condition*'s (input intensities -> model space) and the *target*'s
(model space -> output intensities); they differ when the input spans another range than
its clean counterpart (a low-dose noisy image spans far more than its clean target).
``normalize="model"`` takes both from the checkpoint (and warns, once, when a sample of the
input lies far outside the condition's range); ``normalize="auto"`` takes the condition's
range from robust percentiles of a seeded sample of input chunks, and the target's by the
same affine transfer (the model's target range is to its condition range as the run's
target range is to the input's). Never per tile or per chunk: that would make seams and
break chunking invariance. The map itself is
:class:`emdiffuse.models.normalization.Normalization`.
"""

from __future__ import annotations

import logging

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.normalization import PERCENTILES, Normalization, pair_from_model

log = logging.getLogger(__name__)


def sample_percentiles(
    data, *, n_chunks: int = 16, seed: int = 0, percentiles=PERCENTILES
) -> Normalization:
    """Robust percentiles of a seeded sample of up to ``n_chunks`` chunks of ``data``
    (a dask array: only those chunks are read)."""
    grid = [len(c) for c in data.chunks]
    total = int(np.prod(grid))
    rng = np.random.default_rng(seed)
    picks = rng.choice(total, size=min(n_chunks, total), replace=False)
    values = []
    for flat in sorted(int(p) for p in picks):
        index = np.unravel_index(flat, grid)
        block = np.asarray(data.blocks[tuple(int(i) for i in index)].compute(scheduler="sync"))
        values.append(block.ravel())
    sample = np.concatenate(values).astype(np.float64)
    low, high = np.percentile(sample, percentiles)
    if not high > low:
        raise InputError(
            "the sampled input chunks have no contrast (all voxels equal); "
            "pass normalize='model' to use the model's training range"
        )
    return Normalization(float(low), float(high))


def transfer(model_condition: Normalization, model_target: Normalization,
             condition: Normalization) -> Normalization:
    """The target range that is to ``condition`` what ``model_target`` is to
    ``model_condition``: the affine map taking the model's condition range onto
    ``condition``, applied to the model's target range."""
    if model_condition == model_target:
        return condition  # one range for both: exactly the input's
    scale = (condition.high - condition.low) / (model_condition.high - model_condition.low)
    low = condition.low + scale * (model_target.low - model_condition.low)
    high = condition.low + scale * (model_target.high - model_condition.low)
    return Normalization(low, high)


def run_normalization(
    normalize: str, config, data, *, seed: int
) -> tuple[Normalization, Normalization]:
    """The run's ``(condition, target)`` maps: the model's training ranges (``model``), or
    the input's percentiles and the target range transferred from them (``auto``)."""
    if normalize == "model":
        return pair_from_model(config)
    condition = sample_percentiles(data, seed=seed)
    try:
        model_condition, model_target = pair_from_model(config)
    except InputError:  # the checkpoint stores no range: input and output alike
        return condition, condition
    return condition, transfer(model_condition, model_target, condition)


def far_from_training_range(low: float, high: float, sample_low: float, sample_high: float) -> bool:
    """True when the input's sampled range ``sample_low..sample_high`` mostly lies outside
    the model's ``low..high`` or spans under 5 % of it (the output is then meaningless)."""
    x0, x1 = ((v - low) / (high - low) * 2 - 1 for v in (sample_low, sample_high))
    inside = max(0.0, min(x1, 1.0) - max(x0, -1.0))
    return x1 - x0 < 0.1 or inside < 0.5 * (x1 - x0)


def warn_if_far_from_training_range(data, model_norm, *, seed: int = 0) -> bool:
    """Sample ``data``'s percentiles (as ``normalize="auto"`` would) and log one warning when
    they are far from the model's training range of its input, ``model_norm`` (the
    condition's). Returns whether it warned."""
    try:
        sample = sample_percentiles(data, seed=seed)
    except InputError:  # no contrast in the sample: nothing to compare
        return False
    low, high = model_norm.low, model_norm.high
    if not far_from_training_range(low, high, sample.low, sample.high):
        return False
    log.warning(
        "the input's intensities (%.4g..%.4g, the %g-%gth percentiles of a sample) lie far "
        "outside the model's training range (%.4g..%.4g), so the output would be meaningless; "
        "pass --normalize auto to map the input's own range (or convert the input to the "
        "model's range)",
        sample.low, sample.high, *PERCENTILES, low, high,
    )  # fmt: skip
    return True
