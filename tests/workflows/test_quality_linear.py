"""benchmarks/quality/quality_linear.py: the quality report's least-squares linear filter row.

Where the target is an exact linear filter of the condition the fitted filter recovers it on
unseen data: a 3×3 blur for denoising, and for isotropic reconstruction slices that vary
linearly in z (the slices between two inputs are their interpolation), written into a volume
whose input slices are kept.
"""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage


@pytest.fixture(scope="module")
def ql(repo_root):
    if "quality_linear" in sys.modules:
        return sys.modules["quality_linear"]
    path = repo_root / "benchmarks" / "quality" / "quality_linear.py"
    spec = importlib.util.spec_from_file_location("quality_linear", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_linear"] = module
    spec.loader.exec_module(module)
    return module


def _blur(stack):
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 16
    return np.stack([ndimage.convolve(s, kernel, mode="mirror") for s in stack]).astype(np.float32)


def test_denoise_filter_recovers_a_blur_on_unseen_images(ql):
    rng = np.random.default_rng(0)
    train, test = rng.random((4, 64, 64)).astype(np.float32), rng.random((2, 40, 40)).astype(np.float32)
    data = SimpleNamespace(level=SimpleNamespace(task="denoise", factor=1),
                           train={"noisy": train, "clean": _blur(train)},
                           test_inputs=[test, test[::-1]])  # fmt: skip
    outs = ql.restore(data, 3, np.random.default_rng(1))
    assert len(outs) == 2 and outs[0].shape == test.shape and outs[0].dtype == np.float32
    np.testing.assert_allclose(outs[0], _blur(test), atol=1e-4)
    np.testing.assert_allclose(outs[1], _blur(test[::-1]), atol=1e-4)
    # a 1×1 filter cannot blur: the check above can fail
    assert np.abs(ql.restore(data, 1, np.random.default_rng(1))[0] - _blur(test)).max() > 0.05


def test_isotropic_filter_interpolates_linear_z_and_keeps_the_input_slices(ql):
    rng = np.random.default_rng(2)
    k = 4

    def ramp(n, seed):
        a, b = np.random.default_rng(seed).random((2, 1, 48, 48))
        z = np.arange(n, dtype=np.float64)[:, None, None]
        return (a + b * z / n).astype(np.float32)

    train, truth = ramp(8 * k + 1, 3), ramp(3 * k + 1, 4)
    data = SimpleNamespace(level=SimpleNamespace(task="isotropic", factor=k),
                           train={"clean": train}, test_inputs=[truth[::k]])  # fmt: skip
    out = ql.restore(data, 3, rng)[0]
    assert out.shape == truth.shape
    np.testing.assert_array_equal(out[::k], truth[::k])
    np.testing.assert_allclose(out, truth, atol=1e-4)


def test_slice_stacks_are_each_slice_with_its_neighbours_mirrored_at_the_ends(ql):
    slices = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 3, 3), np.float32)
    stacks = ql.slice_stacks(slices, 1)
    assert stacks.shape == (4, 3, 3, 3)
    assert stacks[:, :, 0, 0].tolist() == [[1, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 2]]
    assert np.array_equal(ql.slice_stacks(slices, 0)[:, 0], slices)


def test_a_filter_reading_neighbours_recovers_their_average(ql):
    # the target is the mean of three adjacent slices: only a filter reading z finds it
    rng = np.random.default_rng(1)
    noisy = rng.random((12, 64, 64))
    clean = ql.slice_stacks(noisy, 1).mean(axis=1)[:, None]
    w, b = ql.fit(ql.slice_stacks(noisy, 1), clean, 3, rng)
    test = rng.random((5, 40, 40))
    out = ql.apply(ql.slice_stacks(test, 1), w, b, 3)[:, 0]
    assert np.abs(out - ql.slice_stacks(test, 1).mean(axis=1)).max() < 1e-6
    one_slice = ql.apply(test[:, None], *ql.fit(noisy[:, None], clean, 3, rng), 3)[:, 0]
    assert np.abs(one_slice - ql.slice_stacks(test, 1).mean(axis=1)).max() > 0.1
