"""The least-squares linear filter of a task: a Wiener filter learned from the training data.

The filter maps the condition as the model sees it (the noisy slice; the low-resolution slice
upsampled as the super-resolution model's condition; the bounding slices of an isotropic
interval) to the target by least squares, fitted the way training fits the mean network's skip
(``emdiffuse.models.mean_net.least_squares_skip``, 64 random 48² training patches as read) and
applied with mirrored edges. No network and no training loop: a classical peer, and the start
of the residual kind's mean network where its skip is as wide.
"""

from __future__ import annotations

import numpy as np
import torch

from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.mean_net import least_squares_skip
from emdiffuse.models.presets import make_config
from emdiffuse.training.degrade import blur_downsample_xy

SIZE = 7  # the quality report's row (the isotropic models' default skip width)
PATCHES, PATCH = 64, 48  # as training fits the skip (build.SKIP_FIT_PATCHES, the harness's patch)


def isotropic_pairs(volume: np.ndarray, k: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cond (n, 2 + 2c, Y, X), target (n, k - 1, Y, X))`` of every interval of ``volume``
    (its every k-th slice the input), the input slices mirrored at the ends."""
    cond = isotropic_condition(volume[::k], context)
    target = np.stack([volume[i * k + 1 : i * k + k] for i in range(len(cond))])
    return cond, target


def z_windows(slices: np.ndarray, context: int, width: int) -> np.ndarray:
    """Every run of ``width`` consecutive slices of ``slices`` padded by ``context`` mirrored
    slices at each end, in z order: ``(n + 2 context - width + 1, width, Y, X)``."""
    padded = np.pad(slices, ((context, context), (0, 0), (0, 0)), mode="reflect")
    return np.stack([padded[i : i + width] for i in range(len(padded) - width + 1)])


def isotropic_condition(slices: np.ndarray, context: int) -> np.ndarray:
    """The ``2 + 2 context`` input slices around each interval of ``slices``, mirrored."""
    return z_windows(slices, context, 2 + 2 * context)


def slice_stacks(slices: np.ndarray, context: int) -> np.ndarray:
    """``(n, 1 + 2c, Y, X)``: each slice of a contiguous stack with ``context`` neighbours on
    each side in z order, mirrored at the ends (the condition of a denoiser reading z)."""
    return z_windows(slices, context, 1 + 2 * context)


def super_resolve_condition(low: np.ndarray, k: int) -> np.ndarray:
    """``(n, 1, kY, kX)``: the low-resolution slices upsampled as the model's condition is."""
    mode = make_config("emdiffuse-r", "tiny", scale_factor=k).cond_upsample
    t = torch.from_numpy(np.ascontiguousarray(low[:, None], dtype=np.float32))
    return upsample_xy(t, k, mode).double().numpy()


def random_patches(
    cond: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`PATCHES` random :data:`PATCH`² patches (smaller images: their side) of
    ``(n, C, Y, X)`` pairs, as float64."""
    side = min(PATCH, *cond.shape[2:])
    picks = rng.integers(0, len(cond), PATCHES)
    ys = rng.integers(0, cond.shape[2] - side + 1, PATCHES)
    xs = rng.integers(0, cond.shape[3] - side + 1, PATCHES)
    boxes = [(i, slice(y, y + side), slice(x, x + side)) for i, y, x in zip(picks, ys, xs, strict=True)]  # fmt: skip
    c = np.stack([cond[i, :, y, x] for i, y, x in boxes])
    t = np.stack([target[i, :, y, x] for i, y, x in boxes])
    return torch.from_numpy(c).double(), torch.from_numpy(t).double()


def fit(cond: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator):
    """``(weights, bias)`` of the ``size``² least-squares filter from ``cond`` to ``target``."""
    return least_squares_skip(*random_patches(cond, target, rng), size)


def apply(cond: np.ndarray, weights, bias, size: int) -> np.ndarray:
    """The filter over ``(n, C, Y, X)`` conditions, edges mirrored: ``(n, T, Y, X)``."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], size, size)
    x = torch.from_numpy(np.ascontiguousarray(cond)).double()
    r = size // 2
    if r:
        x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    b = torch.as_tensor(bias, dtype=torch.float64)[:, None, None]
    return (torch.nn.functional.conv2d(x, w) + b).numpy()


def restore(data, size: int, rng: np.random.Generator, context: int = 0) -> list[np.ndarray]:
    """The filter fitted on ``data.train`` (a harness ``TaskData``) applied to each of its test
    inputs, on the truth's grid: denoise and super-resolve ``(z, Y, X)`` stacks, isotropic the
    volume with ``(n - 1) k + 1`` slices (input slices kept, the ones between filtered)."""
    task, k = data.level.task, data.level.factor
    if task == "isotropic":
        w, b = fit(*isotropic_pairs(data.train["clean"], k, context), size, rng)
        outs = []
        for slices in data.test_inputs:
            pred = apply(isotropic_condition(slices, context), w, b, size)
            volume = np.empty(((len(slices) - 1) * k + 1, *slices.shape[1:]), np.float32)
            volume[::k] = slices
            for i, block in enumerate(pred):
                volume[i * k + 1 : i * k + k] = block
            outs.append(volume)
        return outs
    if task == "denoise":
        w, b = fit(data.train["noisy"][:, None], data.train["clean"][:, None], size, rng)
        return [apply(x[:, None], w, b, size)[:, 0].astype(np.float32) for x in data.test_inputs]
    clean = data.train["clean"]
    w, b = fit(super_resolve_condition(blur_downsample_xy(clean, k), k), clean[:, None], size, rng)
    return [apply(super_resolve_condition(x, k), w, b, size)[:, 0].astype(np.float32)
            for x in data.test_inputs]  # fmt: skip


def filter_table(rows: list[dict], context_header: str, context_cell) -> str:
    """Markdown of linear-filter scores: one line per level and z context (``context_cell``
    of the context in its column headed ``context_header``), one column per filter width."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    lines = [f"| level | {context_header} | " + " | ".join(f"{s}×{s}" for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]  # fmt: skip
    for key in dict.fromkeys(r["level"] for r in rows):
        mine = [r for r in rows if r["level"] == key]
        for context in dict.fromkeys(r["z_context"] for r in mine):
            cells = " | ".join(f"{r['psnr']:.2f} / {r['ssim']:.3f}"
                               for r in mine if r["z_context"] == context)  # fmt: skip
            lines.append(f"| {key} | {context_cell(context)} | {cells} |")
    return "\n".join(lines)

