"""Augmentation of training pairs: the same random transform applied to condition and target.

Arrays are ``(C, h, w)`` numpy images; ``cond`` and ``target`` may sit on different grids
(super-resolution: ``target`` is ``k`` times finer), which flips and 90° rotations respect.
Intensity jitter is ``x -> scale * x + offset`` in model space, the same for both, so the
pair stays consistent. Every draw comes from the ``rng`` passed in (a per-sample generator),
never from global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augment:
    """Which augmentations to draw.

    ``flips``: random flips of y and x; ``rotations``: random multiples of 90° in the image
    plane (only for square images, so batches keep one shape); ``reverse_slices``: reverse the
    slice order of both condition and target (isotropic recipes: z → -z is as likely as z);
    ``scale``/``offset``: intensity jitter ranges, ``scale`` drawn from ``[1 - s, 1 + s]`` and
    ``offset`` from ``[-o, o]`` (model-space units).
    """

    flips: bool = True
    rotations: bool = True
    reverse_slices: bool = False
    scale: float = 0.1
    offset: float = 0.1

    def __call__(
        self, cond: np.ndarray, target: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return augment_pair(cond, target, rng, self)


NONE = Augment(flips=False, rotations=False, reverse_slices=False, scale=0.0, offset=0.0)


def augment_pair(
    cond: np.ndarray, target: np.ndarray, rng: np.random.Generator, spec: Augment = Augment()
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random draw of ``spec`` to ``cond`` and ``target`` (new arrays; inputs are
    not modified). The number of draws from ``rng`` does not depend on the data."""
    flip_y, flip_x, reverse = rng.random(3) < 0.5
    quarter = int(rng.integers(0, 4))
    scale = 1.0 + spec.scale * (2.0 * rng.random() - 1.0)
    offset = spec.offset * (2.0 * rng.random() - 1.0)
    square = cond.shape[-1] == cond.shape[-2] and target.shape[-1] == target.shape[-2]
    out = []
    for a in (cond, target):
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
            a = (a * np.float32(scale) + np.float32(offset)).astype(np.float32)
        out.append(a)
    return out[0], out[1]


__all__ = ["Augment", "NONE", "augment_pair"]
