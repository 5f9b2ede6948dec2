"""Augmentation of training pairs: the same random transform applied to condition and target.

Arrays are ``(C, h, w)`` numpy images; ``cond`` and ``target`` may sit on different grids
(super-resolution: ``target`` is ``k`` times finer), which flips and 90° rotations respect.
Intensity jitter is a change of the detector's gain and offset: one affine map of raw
intensities, ``raw -> c + scale * (raw - c) + offset * h`` with ``c`` the centre and ``h`` the
half-range of the target's intensity range, applied to condition and target alike. In the
target's model space that is ``x -> scale * x + offset``; the condition has its own range
(:mod:`emdiffuse.models.normalization`), so :func:`condition_jitter` gives the same raw map in
its model space. (The same model-space map on both would shift a noisy condition, whose range
is wider, by more raw units than its target: the network would learn to pass on only part of
a brightness difference — the synthetic denoising bias of issue 14.) Every draw comes from
the ``rng`` passed in (a per-sample generator), never from global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emdiffuse.models.normalization import Normalization

DEFAULT_JITTER = 0.2  # gain 1 +- 0.2, offset +- 0.2 in the target's model space (10 % of range)


@dataclass(frozen=True)
class Augment:
    """Which augmentations to draw.

    ``flips``: random flips of y and x; ``rotations``: random multiples of 90° in the image
    plane (only for square images, so batches keep one shape); ``reverse_slices``: reverse the
    slice order of both condition and target (isotropic recipes: z → -z is as likely as z);
    ``scale``/``offset``: intensity jitter ranges, ``scale`` drawn from ``[1 - s, 1 + s]`` and
    ``offset`` from ``[-o, o]`` (the target's model-space units: 0.1 is 5 % of its range).
    """

    flips: bool = True
    rotations: bool = True
    reverse_slices: bool = False
    scale: float = DEFAULT_JITTER
    offset: float = DEFAULT_JITTER

    def __call__(
        self, cond: np.ndarray, target: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return augment_pair(cond, target, rng, self)


NONE = Augment(flips=False, rotations=False, reverse_slices=False, scale=0.0, offset=0.0)


def training_augment(
    recipe: str, intensity_jitter: float = DEFAULT_JITTER, rotations: bool = True
) -> Augment:
    """The training augmentation of a recipe: flips, 90° rotations unless ``rotations`` is
    False, the slice order reversed for the isotropic recipes (z -> -z is as likely as z),
    and the intensity jitter."""
    return Augment(rotations=rotations, reverse_slices=recipe in ("isotropic", "anisotropic"),
                   scale=intensity_jitter, offset=intensity_jitter)  # fmt: skip


def condition_jitter(
    scale: float, offset: float, condition: Normalization, target: Normalization
) -> tuple[float, float]:
    """The condition's model-space ``(scale, offset)`` for the raw-intensity map that
    ``x -> scale * x + offset`` is in the target's model space.

    With ``c`` the centres and ``h`` the half-ranges: ``scale`` is unchanged and the offset
    is ``((1 - scale) (c_t - c_c) + offset h_t) / h_c``.
    """
    c_t, c_c = target.low + target.half_range, condition.low + condition.half_range
    shift = (1.0 - scale) * (c_t - c_c) + offset * target.half_range
    return scale, shift / condition.half_range


def augment_pair(
    cond: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    spec: Augment = Augment(),
    ranges: tuple[Normalization, Normalization] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random draw of ``spec`` to ``cond`` and ``target`` in model space (new
    arrays; inputs are not modified). ``ranges``: the (condition, target) intensity ranges
    the two were normalised with, so that the intensity jitter is one raw-unit change for
    both; None when they share one range. The number of draws from ``rng`` does not depend
    on the data."""
    flip_y, flip_x, reverse = rng.random(3) < 0.5
    quarter = int(rng.integers(0, 4))
    scale = 1.0 + spec.scale * (2.0 * rng.random() - 1.0)
    offset = spec.offset * (2.0 * rng.random() - 1.0)
    jitter = [(scale, offset), (scale, offset)]
    if ranges is not None:
        jitter[0] = condition_jitter(scale, offset, *ranges)
    square = cond.shape[-1] == cond.shape[-2] and target.shape[-1] == target.shape[-2]
    out = []
    for a, (gain, shift) in zip((cond, target), jitter, strict=True):
        if spec.flips and flip_y:
            a = a[..., ::-1, :]
        if spec.flips and flip_x:
            a = a[..., ::-1]
        if spec.rotations and square and quarter:
            a = np.rot90(a, quarter, axes=(-2, -1))
        if spec.reverse_slices and reverse:
            a = a[::-1]
        a = np.ascontiguousarray(a, dtype=np.float32)
        if spec.scale or spec.offset:
            a = (a * np.float32(gain) + np.float32(shift)).astype(np.float32)
        out.append(a)
    return out[0], out[1]


__all__ = ["Augment", "NONE", "DEFAULT_JITTER", "augment_pair", "condition_jitter", "training_augment"]
