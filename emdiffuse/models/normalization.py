"""The one intensity normalisation: raw units <-> model space [-1, 1], fixed once per run.

``x = (raw - low) / h - 1`` with ``h = (high - low) / 2``, computed in float64 and returned
as float32; the inverse ``raw = (x + 1) h + low`` is float64. ``clip=True`` clips the model
space to [-1, 1] (what the network saw in training: the loader clips, and so does
:func:`normalize`); the whole-volume pipeline maps without clipping. ``low, high`` come from
the model's training statistics (``config.normalization``) or, with ``normalize="auto"``,
from robust :data:`PERCENTILES` of a seeded sample of input chunks read once on the client
(``emdiffuse.pipeline.intensity``) — never per tile or per chunk, which would make seams and
break chunking invariance.

Condition and target have their own ranges. A model maps its condition (the noisy, low-
resolution or anisotropic input) with ``config.condition_normalization`` and its output with
``config.normalization`` (the target's range: what outputs are denormalised with). A low-dose
noisy image spans far more than its clean target; one shared range would squeeze the target
into a corner of [-1, 1] (the intensity bias of issue 14). ``condition_normalization`` None
means "the same as ``normalization``" (older checkpoints, reference imports).
:func:`pair_from_model` gives the (condition, target) pair; :func:`as_pair` reads the forms a
caller may pass (one range for both, or the pair); :func:`robust_range` is the one percentile
estimate (the loader's, for each side from its own source).

Every caller uses this module: the training loader, the Enhancer's users (trainer
validation, the demo's evaluation), the pipeline's workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    @classmethod
    def of(cls, norm: Normalization | Mapping[str, float] | Any) -> Normalization:
        """From itself, a ``{"low", "high"}`` mapping, an object with ``low``/``high``, or a
        model config (its ``normalization``)."""
        if isinstance(norm, Normalization):
            return norm
        if not isinstance(norm, Mapping) and hasattr(norm, "normalization"):
            norm = norm.normalization
        if isinstance(norm, Mapping):
            return cls(float(norm["low"]), float(norm["high"]))
        return cls(float(norm.low), float(norm.high))

    @property
    def half_range(self) -> float:
        return (self.high - self.low) / 2.0

    def forward(self, raw: np.ndarray, *, clip: bool = False) -> np.ndarray:
        """Raw -> model space: float64 arithmetic, float32 result; ``clip`` to [-1, 1]."""
        x = (np.asarray(raw, dtype=np.float64) - self.low) / self.half_range - 1.0
        if clip:
            np.clip(x, -1.0, 1.0, out=x)
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
    return Normalization.of(norm)


def condition_from_model(config) -> Normalization:
    """The range the model's condition (its input) is mapped with:
    ``config.condition_normalization``, or ``config.normalization`` when that is None."""
    norm = getattr(config, "condition_normalization", None)
    return from_model(config) if norm is None else Normalization.of(norm)


def pair_from_model(config) -> tuple[Normalization, Normalization]:
    """``(condition, target)`` ranges of a model config: the input is mapped to model space
    with the first, the output back to raw units with the second."""
    return condition_from_model(config), from_model(config)


def as_pair(norm: Any) -> tuple[Normalization, Normalization]:
    """``(condition, target)`` from what a caller may give: a model config; one range
    (a :class:`Normalization` or ``{"low", "high"}``: both sides alike, as before separate
    ranges existed); ``{"condition": range, "target": range}``; or a ``(condition, target)``
    sequence."""
    if isinstance(norm, Mapping) and set(norm) == {"condition", "target"}:
        return Normalization.of(norm["condition"]), Normalization.of(norm["target"])
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        return Normalization.of(norm[0]), Normalization.of(norm[1])
    if not isinstance(norm, (Mapping, Normalization)) and hasattr(norm, "normalization"):
        return pair_from_model(norm)
    single = Normalization.of(norm)
    return single, single


def robust_range(values: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> Normalization:
    """The :data:`PERCENTILES` of ``values`` (float64) as a :class:`Normalization`; raises
    :class:`InputError` when they are equal (no contrast)."""
    low, high = np.percentile(np.asarray(values, dtype=np.float64).ravel(), percentiles)
    return Normalization(float(low), float(high))


def normalize(raw: np.ndarray, norm, *, clip: bool = True) -> np.ndarray:
    """Raw intensities -> model space float32 (clipped to [-1, 1] by default); ``norm`` is a
    model config, a ``{"low", "high"}`` mapping or a :class:`Normalization`."""
    return Normalization.of(norm).forward(raw, clip=clip)


def denormalize(x: np.ndarray, norm, *, dtype: Any = np.float32) -> np.ndarray:
    """Model space -> raw intensities in ``dtype`` (the inverse of :func:`normalize`; integer
    dtypes are rounded and clipped to their range)."""
    return to_dtype(Normalization.of(norm).inverse(x), dtype)


def to_dtype(raw: np.ndarray, dtype) -> np.ndarray:
    """Cast raw-unit values to ``dtype``: rounded and clipped for integer dtypes."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(raw), info.min, info.max).astype(dtype)
    return np.asarray(raw).astype(dtype)


__all__ = [
    "PERCENTILES", "Normalization", "from_model", "condition_from_model", "pair_from_model",
    "as_pair", "robust_range", "normalize", "denormalize", "to_dtype",
]  # fmt: skip
