"""Align one moving image onto its fixed partner, slice by slice, in memory.

Per yx slice: a rigid shift by phase correlation (sub-pixel), then a dense optical flow
(:func:`dense_flow`), both estimated on smoothed, standardised copies; the raw moving image
is warped once with the combined displacement (:func:`register_pair`). The options of one
alignment are an :class:`Alignment`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import window
from skimage.registration import optical_flow_ilk, optical_flow_tvl1, phase_cross_correlation
from skimage.transform import warp

from emdiffuse.errors import InputError
from emdiffuse.models.normalization import to_dtype
from emdiffuse.training.registration.raft import load_raft, raft_flow
from emdiffuse.training.registration.report import RegistrationReport

METHODS = ("rigid", "flow", "raft")
SOLVERS = ("ilk", "tvl1")


@dataclass(frozen=True)
class Alignment:
    """How slices are aligned (the defaults of :func:`register_pair` and ``register_volumes``).

    ``method``: ``"rigid"`` (phase-correlation shift), ``"flow"`` (shift, then a dense
    scikit-image flow: ``solver`` ``"ilk"`` with window ``radius`` or ``"tvl1"``) or
    ``"raft"`` (shift, then torchvision RAFT with local weights). ``smooth_sigma`` (voxels)
    is the Gaussian applied before estimating; ``flow_sigma`` (voxels) smooths the flow.
    """

    method: str = "flow"
    smooth_sigma: float = 1.0
    upsample_factor: int = 20
    solver: str = "ilk"
    radius: int = 7
    flow_sigma: float = 4.0

    @classmethod
    def of(cls, caller: str, options: Mapping[str, Any]) -> Alignment:
        """The alignment that the keyword ``options`` of ``caller`` ask for, the defaults for
        the rest (``register_pair`` and ``register_volumes`` take these fields as keywords)."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**options)

    def check(self, raft_weights: str | Path | None) -> None:
        if self.method not in METHODS:
            raise InputError(
                f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}"
            )
        if self.method == "raft" and raft_weights is None:
            raise InputError(
                "--method raft needs --raft-weights PATH (a local RAFT weights file); "
                "nothing is downloaded"
            )
        if self.solver not in SOLVERS:
            raise InputError(
                f"flow solver {self.solver!r} is unknown; use one of {', '.join(SOLVERS)}"
            )


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (NaN if either is constant there)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _standardise(image: np.ndarray, sigma: float) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if sigma > 0:
        image = ndi.gaussian_filter(image, sigma, mode="nearest")
    std = float(image.std())
    return (image - float(image.mean())) / (std if std > 0 else 1.0)


def _grid(shape: tuple[int, int]) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")).astype(
        np.float32
    )


def warp_image(image: np.ndarray, displacement: np.ndarray, *, order: int = 3) -> np.ndarray:
    """``out[r] = image[r + displacement[:, r]]`` (float32; edges continued)."""
    coords = _grid(image.shape) + displacement
    return warp(
        np.asarray(image, dtype=np.float32), coords, order=order, mode="edge", preserve_range=True
    ).astype(np.float32)


def _inside(displacement: np.ndarray) -> np.ndarray:
    """Voxels whose sampling point lies inside the image."""
    coords = _grid(displacement.shape[1:]) + displacement
    ny, nx = displacement.shape[1:]
    return (coords[0] >= 0) & (coords[0] <= ny - 1) & (coords[1] >= 0) & (coords[1] <= nx - 1)


def rigid_shift(
    moving: np.ndarray, fixed: np.ndarray, *, smooth_sigma: float = 1.0, upsample_factor: int = 20
) -> np.ndarray:
    """Sub-pixel (dy, dx) shift that moves ``moving`` onto ``fixed`` (phase correlation).

    Both are smoothed and standardised and tapered by a Hann window (so the image borders
    do not pull the peak to zero); plain cross-correlation (no spectral whitening) is used,
    which is steadier than whitened phase correlation on noisy images.
    """
    taper = window("hann", fixed.shape).astype(np.float32)
    shift, _, _ = phase_cross_correlation(
        _standardise(fixed, smooth_sigma) * taper,
        _standardise(moving, smooth_sigma) * taper,
        upsample_factor=upsample_factor,
        normalization=None,
    )
    return np.asarray(shift, dtype=np.float64)


def dense_flow(
    moving: np.ndarray,
    fixed: np.ndarray,
    *,
    smooth_sigma: float = 1.0,
    solver: str = "ilk",
    radius: int = 7,
    flow_sigma: float = 4.0,
    raft=None,
) -> np.ndarray:
    """Displacement (2, y, x) with ``fixed[r] ~ moving[r + d(r)]`` (skimage ILK/TV-L1, or RAFT)."""
    f = _standardise(fixed, smooth_sigma)
    m = _standardise(moving, smooth_sigma)
    if raft is not None:
        flow = raft_flow(raft, m, f)
    elif solver == "ilk":
        flow = optical_flow_ilk(f, m, radius=radius)
    elif solver == "tvl1":
        flow = optical_flow_tvl1(f, m)
    else:
        raise InputError(f"flow solver {solver!r} is unknown; use one of {', '.join(SOLVERS)}")
    if flow_sigma > 0 and raft is None:  # RAFT's flow is smooth already
        flow = np.stack([ndi.gaussian_filter(c, flow_sigma, mode="nearest") for c in flow])
    return np.asarray(flow, dtype=np.float32)


# --------------------------------------------------------------------------- one slice


def register_slice(
    moving: np.ndarray, fixed: np.ndarray, how: Alignment, raft=None
) -> tuple[np.ndarray, RegistrationReport, np.ndarray]:
    """(aligned moving, its one-slice report, the displacement (2, y, x)) of one yx slice."""
    moving = np.asarray(moving, dtype=np.float32)
    fixed = np.asarray(fixed, dtype=np.float32)
    nan = np.array([np.nan])
    if float(moving.std()) == 0 or float(fixed.std()) == 0:  # blank slice: nothing to align
        report = RegistrationReport(
            how.method, np.zeros((1, 2)), nan, nan, nan.copy(), np.zeros(1), how.solver
        )
        return moving, report, np.zeros((2, *fixed.shape), np.float32)
    shift = rigid_shift(
        moving, fixed, smooth_sigma=how.smooth_sigma, upsample_factor=how.upsample_factor
    )
    rigid = np.broadcast_to(-shift[:, None, None], (2, *fixed.shape)).astype(np.float32)
    total = rigid
    flow = np.zeros_like(rigid)
    if how.method != "rigid":
        flow = dense_flow(
            warp_image(moving, rigid, order=1), fixed, smooth_sigma=how.smooth_sigma,
            solver=how.solver, radius=how.radius, flow_sigma=how.flow_sigma, raft=raft,
        )  # fmt: skip
        total = rigid + flow
    aligned = warp_image(moving, total)
    return aligned, _slice_report(moving, fixed, aligned, shift, rigid, flow, total, how), total


def _slice_report(moving, fixed, aligned, shift, rigid, flow, total, how: Alignment):
    """NCC with ``fixed`` before, after the shift and after the flow, over the voxels that
    every stage maps from inside the moving image."""
    mask = _inside(rigid) & _inside(total)
    if mask.sum() < 16:
        mask = np.ones(fixed.shape, bool)
    sigma = how.smooth_sigma
    f_s = _standardise(fixed, sigma)
    ncc_flow = float("nan")
    if how.method != "rigid":
        ncc_flow = ncc(f_s, _standardise(aligned, sigma), mask)
    return RegistrationReport(
        method=how.method,
        solver=how.solver,
        shift=shift[None].astype(np.float64),
        ncc_before=np.array([ncc(f_s, _standardise(moving, sigma), mask)]),
        ncc_rigid=np.array([ncc(f_s, _standardise(warp_image(moving, rigid), sigma), mask)]),
        ncc_flow=np.array([ncc_flow]),
        flow_p99=np.array([float(np.percentile(np.hypot(flow[0], flow[1])[mask], 99))]),
    )


def check_slices(shape) -> None:
    if min(shape[-2:]) < 8:
        raise InputError(
            f"slices of shape {shape[-2:]} are too small to register; need at least 8x8"
        )


# --------------------------------------------------------------------------- a pair


def register_pair(
    moving: np.ndarray,
    fixed: np.ndarray,
    *,
    raft_weights: str | Path | None = None,
    return_displacement: bool = False,
    **alignment: Any,
):
    """Warp ``moving`` onto ``fixed`` (both yx, or zyx registered slice by slice).

    ``alignment``: the fields of :class:`Alignment` as keywords (``method``,
    ``smooth_sigma``, ``upsample_factor``, ``solver``, ``radius``, ``flow_sigma``; its
    defaults for the rest); ``raft_weights`` is the local RAFT file for ``method="raft"``. Returns the aligned moving image (dtype of ``moving``, the raw image
    warped once) and a :class:`RegistrationReport`; with ``return_displacement`` also the
    displacement (2, y, x) or (z, 2, y, x) in voxels, ``aligned[r] = moving[r + d(r)]`` (to
    warp other channels or labels the same way). Inputs are not modified.
    """
    how = Alignment.of("register_pair", alignment)
    moving = np.asarray(moving)
    fixed = np.asarray(fixed)
    how.check(raft_weights)
    if moving.ndim not in (2, 3) or moving.shape != fixed.shape:
        raise InputError(
            f"moving {moving.shape} and fixed {fixed.shape} must be yx or zyx images of the "
            "same shape"
        )
    check_slices(fixed.shape)
    raft = load_raft(raft_weights) if how.method == "raft" else None
    stack_m = moving[None] if moving.ndim == 2 else moving
    stack_f = fixed[None] if fixed.ndim == 2 else fixed
    out = np.empty(stack_m.shape, dtype=moving.dtype)
    displacement = None
    if return_displacement:
        displacement = np.empty((stack_m.shape[0], 2, *stack_m.shape[1:]), np.float32)
    parts = []
    for z in range(stack_m.shape[0]):
        aligned, part, total = register_slice(stack_m[z], stack_f[z], how, raft)
        out[z] = to_dtype(aligned, moving.dtype)
        if displacement is not None:
            displacement[z] = total
        parts.append(part)
    result = (out[0] if moving.ndim == 2 else out), RegistrationReport.concat(parts)
    if displacement is not None:
        return (*result, displacement[0] if moving.ndim == 2 else displacement)
    return result


__all__ = [
    "METHODS", "SOLVERS", "Alignment", "ncc", "warp_image", "rigid_shift", "dense_flow",
    "register_slice", "register_pair",
]  # fmt: skip
