"""Register whole volumes: read lazily, align one output z-chunk per task, write OME-Zarr.

Inputs are opened lazily (OME-Zarr or TIFF) and processed one z-chunk of the output at a
time (each task reads its slices, registers them one by one and writes its chunk), so memory
is bounded by a few slices per worker. The output lives on the fixed grid (fixed's voxel size
and translation) with the moving dtype. All checks run before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask import delayed
from skimage.transform import resize

from emdiffuse.errors import InputError
from emdiffuse.io import check_finite, create_image, finalize_image, open_volume, refuse_output
from emdiffuse.models.normalization import to_dtype
from emdiffuse.training.registration.align import (
    Alignment,
    check_slices,
    register_slice,
)
from emdiffuse.training.registration.overlay import save_overlay
from emdiffuse.training.registration.raft import load_raft
from emdiffuse.training.registration.report import RegistrationReport


def _check_png(path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"report {path} must end in .png")
    if not path.parent.exists():
        raise InputError(
            f"the folder {path.parent} for report {path} does not exist; create it first"
        )


def _resampling(moving_shape, fixed_shape, upsample: bool) -> int:
    """1 for equal grids, else the integer xy factor from moving to fixed (with ``upsample``)."""
    if tuple(moving_shape) == tuple(fixed_shape):
        return 1
    if len(moving_shape) != len(fixed_shape):
        raise InputError(
            f"moving has {len(moving_shape)} axes and fixed {len(fixed_shape)}; both must be yx or both zyx"
        )
    if not upsample:
        raise InputError(
            f"moving shape {tuple(moving_shape)} differs from fixed {tuple(fixed_shape)}; denoising pairs "
            "must have the same shape (for low/high pairs pass --upsample to resample the moving onto the fixed grid)"
        )
    ky, kx = fixed_shape[-2] / moving_shape[-2], fixed_shape[-1] / moving_shape[-1]
    same_z = len(moving_shape) == 2 or moving_shape[0] == fixed_shape[0]
    if not (same_z and ky == kx and ky == int(ky) and ky >= 2):
        raise InputError(
            f"--upsample needs the fixed grid to be an integer k>=2 times the moving grid in y and x "
            f"with the same z; got moving {tuple(moving_shape)} and fixed {tuple(fixed_shape)}"
        )
    return int(ky)


def _upsample_slice(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return resize(
        np.asarray(image, np.float32),
        shape,
        order=3,
        mode="edge",
        anti_aliasing=False,
        preserve_range=True,
    )


@dataclass
class _Pair:
    """The two opened volumes, and the xy factor from the moving grid to the fixed one."""

    moving: Any
    fixed: Any
    factor: int

    @property
    def three_d(self) -> bool:
        return self.fixed.ndim == 3


def register_volumes(
    moving_path: str | Path,
    fixed_path: str | Path,
    out_path: str | Path,
    *,
    raft_weights: str | Path | None = None,
    voxel_size=None,
    upsample: bool = False,
    overwrite: bool = False,
    chunks: Sequence[int] | None = None,
    levels: int | None = None,
    report_png: str | Path | None = None,
    num_workers: int | None = None,
    **alignment: Any,
) -> RegistrationReport:
    """Register the volume at ``moving_path`` onto ``fixed_path``; write it as OME-Zarr.

    ``alignment``: the fields of :class:`Alignment` as keywords, as for
    :func:`~emdiffuse.training.registration.align.register_pair` (``raft_weights``: the local
    RAFT file for ``method="raft"``). Pairs must share the grid; with ``upsample`` a moving image
    on an integer-times coarser xy grid (low/high pairs) is first resampled (cubic) onto the
    fixed grid. ``chunks``/``levels``: the output's chunks and pyramid levels;
    ``report_png``: a before | after overlay of the middle slice; ``num_workers``: threads.
    """
    how = Alignment.of("register_volumes", alignment)
    how.check(raft_weights)
    pair = _open_pair(moving_path, fixed_path, voxel_size, upsample)
    for source in (moving_path, fixed_path):
        refuse_output(out_path, source, overwrite=overwrite)
    _check_png(report_png)
    if chunks is not None and len(chunks) != pair.fixed.ndim:
        raise InputError(
            f"chunks {tuple(chunks)} has {len(chunks)} values but the image has "
            f"{pair.fixed.ndim} axes"
        )
    check_finite(pair.moving)
    check_finite(pair.fixed)
    raft = load_raft(raft_weights) if how.method == "raft" else None
    default = (8, 256, 256) if pair.three_d else (256, 256)
    chunks = tuple(
        min(int(c), int(s)) for c, s in zip(chunks or default, pair.fixed.shape, strict=True)
    )
    target = _create_output(out_path, pair, chunks, overwrite)
    step = chunks[0] if pair.three_d else 1
    report = _register_chunks(pair, target, step, how, raft, num_workers)
    report.extra = {"moving": str(moving_path), "fixed": str(fixed_path),
                    "output": str(out_path), "upsample": pair.factor}  # fmt: skip
    fixed = pair.fixed
    finalize_image(out_path, levels=levels, voxel_size=fixed.voxel_size, axes=fixed.axes,
                   translation=fixed.translation)  # fmt: skip
    if report_png is not None:
        title = f"{Path(str(moving_path)).name} -> {Path(str(fixed_path)).name}"
        _write_overlay(report_png, pair, target, report, title)
    return report


def _open_pair(moving_path, fixed_path, voxel_size, upsample: bool) -> _Pair:
    moving = open_volume(moving_path, voxel_size=voxel_size)
    fixed = open_volume(fixed_path, voxel_size=voxel_size)
    factor = _resampling(moving.shape, fixed.shape, upsample)
    check_slices(fixed.shape)
    return _Pair(moving, fixed, factor)


def _create_output(out_path, pair: _Pair, chunks: tuple[int, ...], overwrite: bool):
    fixed = pair.fixed
    return create_image(
        out_path,
        shape=fixed.shape,
        dtype=pair.moving.dtype,
        chunks=chunks,
        voxel_size=fixed.voxel_size,
        axes=fixed.axes,
        translation=fixed.translation,
        overwrite=overwrite,
        name="registered",
    )


def _register_chunks(
    pair: _Pair, target, step: int, how: Alignment, raft, num_workers: int | None
) -> RegistrationReport:
    """One threaded task per output z-chunk; the per-slice reports joined in z order."""
    n_z = pair.fixed.shape[0] if pair.three_d else 1
    tasks = [
        delayed(_register_chunk)(pair, target, z0, min(z0 + step, n_z), how, raft)
        for z0 in range(0, n_z, step)
    ]
    parts = dask.compute(*tasks, scheduler="threads", num_workers=num_workers)
    return RegistrationReport.concat(parts)


def _register_chunk(pair: _Pair, target, z0: int, z1: int, how: Alignment, raft):
    """Read slices ``z0:z1`` of both, align them one by one, write them into ``target``."""
    sel = (slice(z0, z1),) if pair.three_d else ()
    mov = _read(pair.moving, sel)
    fix = _read(pair.fixed, sel)
    if not pair.three_d:
        mov, fix = mov[None], fix[None]
    yx = tuple(pair.fixed.shape[-2:])
    out = np.empty((z1 - z0, *yx), dtype=pair.moving.dtype)
    parts = []
    for i in range(z1 - z0):
        m = _upsample_slice(mov[i], yx) if pair.factor > 1 else mov[i]
        aligned, part, _ = register_slice(m, fix[i], how, raft)
        out[i] = to_dtype(aligned, pair.moving.dtype)
        parts.append(part)
    target[sel] = out if pair.three_d else out[0]
    return RegistrationReport.concat(parts)


def _read(volume, sel: tuple) -> np.ndarray:
    """A region of a volume as numpy (its data: a lazy dask array, or numpy)."""
    block = volume.data[sel]
    if hasattr(block, "compute"):
        block = block.compute(scheduler="synchronous")
    return np.asarray(block)


def _write_overlay(path, pair: _Pair, target, report: RegistrationReport, title: str) -> None:
    """The before | after overlay of the middle slice."""
    zmid = pair.fixed.shape[0] // 2 if pair.three_d else 0
    sel = (zmid,) if pair.three_d else ()
    f = _read(pair.fixed, sel)
    m = _read(pair.moving, sel)
    if pair.factor > 1:
        m = _upsample_slice(m, tuple(pair.fixed.shape[-2:]))
    a = np.asarray(target[sel])
    if pair.three_d:
        title += f", z={zmid}"
    save_overlay(path, f, m, a, title=title + "  (fixed magenta, moving green)", report=report)


__all__ = ["register_volumes"]
