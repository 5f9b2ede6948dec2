"""What each training recipe reads: its sources, scale factor, patch footprint, and the
train/validation split of the volume into regions (pure functions of the options and shapes).

The footprint is the zyx extent on the target grid that one sample reads: ``(1, H, W)`` for
denoise (plus a margin around a super-resolution target whose low image is synthesised),
``(k + 1, H, W)`` for isotropic, and for anisotropic ``(H, k + 1, W)`` (rows, axis ``y``) or
``(H, W, k + 1)`` (columns, axis ``x``). The split cuts the yx plane into square regions
(full depth) and gives a seeded ``val_fraction`` of them to validation, so no voxel is in
both splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.models.z_context import footprint_span

RECIPES = ("denoise", "super-resolve", "isotropic", "anisotropic")
SPLITS = {"train": 1, "val": 2}
Region = tuple[int, int, int, int]  # y0, y1, x0, x1
_SOURCES = {  # recipe -> (allowed source counts, what to give)
    "denoise": ((2,), "two sources: NOISY,CLEAN"),
    "super-resolve": ((1, 2), "LOW,HIGH or HIGH alone"),
    "isotropic": ((1,), "one isotropic volume"),
    "anisotropic": ((1,), "one anisotropic volume"),
}
_DEFAULT_FACTOR = {"denoise": 1, "super-resolve": 2, "isotropic": 4, "anisotropic": 4}


def normalization_sources(recipe: str, n_sources: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which sources give the condition's and which the target's intensity range: the pair's
    first (noisy, low) and second (clean, high) member; a single volume gives both (a
    synthesised low image is the high volume blurred, in the same units)."""
    if n_sources == 2 and recipe in ("denoise", "super-resolve"):
        return (0,), (1,)
    return tuple(range(n_sources)), tuple(range(n_sources))


def check_options(
    recipe: str, split: str, axis: str, val_fraction: float, rank: int, world_size: int
) -> None:
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'val', got {split!r}")
    if axis not in ("y", "x", "both"):
        raise InputError(f"axis must be 'y', 'x' or 'both', got {axis!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction} must be in [0, 1)")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} must be in 0..{world_size - 1}")


def scale_factor(recipe: str, n_sources: int, factor: int | None) -> int:
    """k of the recipe (after checking the number of sources)."""
    counts, what = _SOURCES[recipe]
    if n_sources not in counts:
        raise InputError(f"{recipe} takes {what}; got {n_sources} source(s)")
    k = int(_DEFAULT_FACTOR[recipe] if factor is None else factor)
    if recipe == "denoise" and k != 1:
        raise InputError(f"denoise keeps the grid; factor must be 1, got {k}")
    if recipe != "denoise" and k < 2:
        raise InputError(f"{recipe} needs a factor k >= 2, got {k}")
    return k


def patch_shape(recipe: str, patch: int | Sequence[int], k: int) -> tuple[int, int]:
    """The target patch (H, W), checked."""
    ph, pw = (patch, patch) if isinstance(patch, (int, np.integer)) else tuple(patch)
    shape = (int(ph), int(pw))
    if min(shape) < 4:
        raise InputError(f"patch {shape} too small; use at least 4 voxels a side")
    if recipe == "super-resolve" and (shape[0] % k or shape[1] % k):
        raise InputError(f"patch {shape} must be a multiple of the factor {k}")
    return shape


def footprint(
    recipe: str, patch: tuple[int, int], k: int, margin: int, axis: str, z_context: int = 0
) -> tuple[int, int, int]:
    """Extent (zyx) of the target-grid region one sample reads; for anisotropic with axis
    ``both``, the box that holds either orientation. Isotropic recipes read ``(2c + 1) k + 1``
    slices (rows, columns) with ``c = z_context``: the bounding pair, the ``k - 1`` between
    and ``c`` slices ``k`` apart beyond each side; denoise reads ``1 + 2c`` slices."""
    ph, pw = patch
    span = footprint_span(k, z_context)
    if recipe == "isotropic":
        return (span, ph, pw)
    if recipe == "anisotropic":
        if axis == "x":
            return (ph, pw, span)
        if axis == "y":
            return (ph, span, pw)
        return (ph, max(span, pw), max(span, pw))
    if recipe == "denoise":
        return (1 + 2 * z_context, ph, pw)
    return (1, ph + 2 * margin, pw + 2 * margin)


def check_pairing(recipe: str, k: int, shapes: list, labels: list[str], foot) -> None:
    """The sources' grids fit the recipe (pairs on one grid, k× finer), the footprint fits."""
    if recipe == "denoise" and shapes[0] != shapes[1]:
        raise InputError(
            f"denoise pairs must share one grid: {labels[0]} is {shapes[0]}, "
            f"{labels[1]} is {shapes[1]}; register them first (emdiffuse register)"
        )
    if recipe == "super-resolve" and len(shapes) == 2:
        (lz, ly, lx), (hz, hy, hx) = shapes
        if lz != hz or hy // k != ly or hx // k != lx:
            raise InputError(
                f"super-resolve pair: {labels[1]} {shapes[1]} is not {k}x "
                f"{labels[0]} {shapes[0]} in y and x; check --factor or the files"
            )
    if any(f > s for f, s in zip(foot, shapes[-1], strict=True)):
        fix = "a smaller --patch" + (" or --z-context" if recipe == "denoise" else " or --factor")
        raise InputError(
            f"{recipe} patch footprint (zyx) {tuple(foot)} does not fit the volume "
            f"{shapes[-1]}; use {fix}"
        )


def region_side(region: int | None, foot_yx: tuple[int, int]) -> int:
    """The split's region side: ``region``, or twice the footprint (at least 32)."""
    side = max(2 * max(foot_yx), 32) if region is None else int(region)
    if side < max(foot_yx):
        raise InputError(
            f"region {side} is smaller than a patch footprint {foot_yx}; "
            "use a larger --region or a smaller patch"
        )
    return side


def split_regions(
    shape_yx: tuple[int, int], foot_yx: tuple[int, int], side: int, val_fraction: float, seed: int
) -> dict[str, list[Region]]:
    """yx regions (y0, y1, x0, x1) per split, each big enough for a footprint."""
    Y, X = shape_yx
    fy, fx = foot_yx
    usable = []
    for y0 in range(0, Y, side):
        for x0 in range(0, X, side):
            y1, x1 = min(y0 + side, Y), min(x0 + side, X)
            if y1 - y0 >= fy and x1 - x0 >= fx:
                usable.append((y0, y1, x0, x1))
    n_val = 0
    if val_fraction > 0:
        n_val = max(1, int(round(val_fraction * len(usable))))
        if len(usable) - n_val < 1:
            raise InputError(
                f"the volume holds only {len(usable)} region(s) of {side} voxels; too few for "
                "a train/validation split: use a smaller region or patch, or val_fraction 0"
            )
    order = np.random.default_rng([seed, 0x5E1]).permutation(len(usable))
    val = sorted(usable[i] for i in order[:n_val])
    train = sorted(usable[i] for i in order[n_val:])
    return {"train": train, "val": val}


__all__ = [
    "RECIPES", "SPLITS", "normalization_sources", "check_options", "scale_factor", "patch_shape", "footprint",

    "check_pairing", "region_side", "split_regions",
]  # fmt: skip
