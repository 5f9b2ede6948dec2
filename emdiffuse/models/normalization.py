"""Global intensity normalisation: raw units <-> model space [-1, 1], fixed once per run.

``x = 2 * (raw - low) / (high - low) - 1``. ``low, high`` come from the model's training
statistics (``config.normalization``) or, with ``normalize="auto"``, from robust percentiles
of a seeded sample of input chunks read once on the client — never per tile or per chunk,
which would make seams and break chunking invariance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from emdiffuse.errors import InputError

PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Normalization:
    """Affine map between raw intensities and model space."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise InputError(
                f"intensity range low={self.low}, high={self.high} is empty or not finite; "
                "check the input's contrast or pass normalize='model'"
            )

    @property
    def half_range(self) -> float:
        return (self.high - self.low) / 2.0

    def forward(self, raw: np.ndarray) -> np.ndarray:
        """Raw -> model space, float32."""
        x = (np.asarray(raw, dtype=np.float64) - self.low) / self.half_range - 1.0
        return x.astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Model space -> raw units, float64."""
        return (np.asarray(x, dtype=np.float64) + 1.0) * self.half_range + self.low

    def scale_std(self, std: np.ndarray) -> np.ndarray:
        """A standard deviation in model space -> raw units."""
        return np.asarray(std, dtype=np.float64) * self.half_range

    def to_dict(self) -> dict[str, float]:
        return {"low": float(self.low), "high": float(self.high)}


def from_model(config) -> Normalization:
    """The model's stored training percentiles (``config.normalization``: mapping or object
    with ``low``/``high``)."""
    norm = getattr(config, "normalization", None)
    if norm is None:
        raise InputError("the checkpoint stores no intensity normalisation; pass normalize='auto'")
    if isinstance(norm, Mapping):
        return Normalization(float(norm["low"]), float(norm["high"]))
    return Normalization(float(norm.low), float(norm.high))


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


def to_dtype(raw: np.ndarray, dtype) -> np.ndarray:
    """Cast raw-unit values to ``dtype``: rounded and clipped for integer dtypes."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(raw), info.min, info.max).astype(dtype)
    return np.asarray(raw).astype(dtype)
