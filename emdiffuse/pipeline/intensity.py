"""The intensity range of a run, fixed once on the client before any chunk runs.

``normalize="model"`` takes the model's training range (and warns, once, when a sample of
the input lies far outside it); ``normalize="auto"`` takes robust percentiles of a seeded
sample of input chunks. Never per tile or per chunk: that would make seams and break
chunking invariance. The map itself is :class:`emdiffuse.models.normalization.Normalization`.
"""

from __future__ import annotations

import logging

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.normalization import PERCENTILES, Normalization, from_model

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


def run_normalization(normalize: str, config, data, *, seed: int) -> Normalization:
    """The run's map: the model's training range (``model``) or the input's (``auto``)."""
    return from_model(config) if normalize == "model" else sample_percentiles(data, seed=seed)


def far_from_training_range(low: float, high: float, sample_low: float, sample_high: float) -> bool:
    """True when the input's sampled range ``sample_low..sample_high`` mostly lies outside
    the model's ``low..high`` or spans under 5 % of it (the output is then meaningless)."""
    x0, x1 = ((v - low) / (high - low) * 2 - 1 for v in (sample_low, sample_high))
    inside = max(0.0, min(x1, 1.0) - max(x0, -1.0))
    return x1 - x0 < 0.1 or inside < 0.5 * (x1 - x0)


def warn_if_far_from_training_range(data, model_norm, *, seed: int = 0) -> bool:
    """Sample ``data``'s percentiles (as ``normalize="auto"`` would) and log one warning when
    they are far from the model's training range ``model_norm``. Returns whether it warned."""
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
