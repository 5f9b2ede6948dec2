"""Synthetic EM volumes and the degradations: chunking invariance, statistics, conventions."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from emdiffuse.training.degrade import (
    add_poisson_gaussian_noise,
    blur_downsample_xy,
    degrade_volume,
    degraded_grid,
    subsample_z,
)
from emdiffuse.training.synthetic import synthetic_block, synthetic_volume

SHAPE = (24, 96, 96)


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return synthetic_block((0, 0, 0), SHAPE, seed=3)


def test_block_equals_region_of_larger_block(clean):
    for origin, shape in [
        ((5, 17, 40), (9, 33, 50)),
        ((0, 95, 0), (24, 1, 96)),
        ((23, 0, 7), (1, 96, 1)),
    ]:
        part = synthetic_block(origin, shape, seed=3)
        region = clean[tuple(slice(o, o + n) for o, n in zip(origin, shape, strict=True))]
        np.testing.assert_array_equal(part, region)


def test_negative_origin_and_far_away_blocks_are_consistent():
    whole = synthetic_block((-10, -40, 1000), (16, 60, 50), seed=1)
    part = synthetic_block((-3, -1, 1020), (5, 20, 30), seed=1)
    np.testing.assert_array_equal(whole[7:12, 39:59, 20:50], part)


def test_volume_chunk_by_chunk_equals_one_shot(clean):
    volume = synthetic_volume(SHAPE, seed=3, chunks=(7, 40, 33))
    assert volume.chunks[0] == (7, 7, 7, 3)
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume.compute(), clean)
    other = synthetic_volume(SHAPE, seed=3, chunks=(24, 96, 96)).compute()
    np.testing.assert_array_equal(other, clean)


def test_seeds_differ(clean):
    other = synthetic_block((0, 0, 0), SHAPE, seed=4)
    assert np.mean(np.abs(other - clean)) > 0.05


def test_range_dtype_and_em_like_statistics():
    image = synthetic_block((0, 0, 0), (32, 256, 256), seed=0)
    assert image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    dark = image < 0.3  # membranes, mitochondrial membranes, vesicle rims
    assert 0.01 < dark.mean() < 0.25
    assert 0.55 < np.median(image) < 0.85  # cytoplasm
    assert image[dark].mean() < 0.5 * np.median(image)
    # granular texture: neighbouring voxels are not identical but correlated
    dx = np.abs(np.diff(image, axis=2))
    assert 0.005 < np.median(dx) < 0.2
    # near-isotropic: same texture statistics along z and x
    dz = np.abs(np.diff(image, axis=0))
    assert 0.7 < np.median(dz) / np.median(dx) < 1.4


def test_voxel_size_scales_structures():
    fine = synthetic_block((0, 0, 0), (1, 256, 256), seed=0, voxel_size=4.0)
    coarse = synthetic_block((0, 0, 0), (1, 256, 256), seed=0, voxel_size=16.0)

    # at a coarser voxel size more cells fit in the same number of voxels: a row crosses
    # more membranes (count the entries into dark runs)
    def crossings(image):
        dark = image[0] < 0.3
        return int(np.sum(dark[:, 1:] & ~dark[:, :-1]))

    assert crossings(coarse) > 1.5 * crossings(fine)


def test_noise_is_chunk_invariant_and_seeded(clean):
    noisy = add_poisson_gaussian_noise(clean, dose=20, seed=5)
    part = add_poisson_gaussian_noise(clean[3:11, 20:70, 5:60], dose=20, seed=5, origin=(3, 20, 5))
    np.testing.assert_array_equal(noisy[3:11, 20:70, 5:60], part)
    other = add_poisson_gaussian_noise(clean, dose=20, seed=6)
    assert np.mean(np.abs(other - noisy)) > 0.05
    lazy = degrade_volume(da.from_array(clean, chunks=(5, 31, 40)), "denoise", dose=20, seed=5)
    np.testing.assert_array_equal(lazy.compute(), noisy)
    assert noisy.dtype == np.float32


@pytest.mark.parametrize("level", [0.05, 0.3, 0.8])
@pytest.mark.parametrize("dose", [4.0, 30.0])
def test_noise_mean_and_variance_follow_poisson_gaussian(level, dose):
    read = 1.5
    flat = np.full((16, 128, 128), level, np.float32)
    noisy = add_poisson_gaussian_noise(flat, dose=dose, read_noise=read, seed=11)
    n = flat.size
    expected_var = level / dose + (read / dose) ** 2
    assert abs(noisy.mean() - level) < 5 * np.sqrt(expected_var / n) + 1e-4
    assert noisy.var() == pytest.approx(expected_var, rel=0.03)
    # pure shot noise: integer electron counts, Poisson variance
    counts = add_poisson_gaussian_noise(flat, dose=dose, read_noise=0.0, seed=11) * dose
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
    assert counts.var() == pytest.approx(level * dose, rel=0.03)


def test_noise_rejects_bad_dose(clean):
    with pytest.raises(ValueError):
        add_poisson_gaussian_noise(clean, dose=0)


def test_blur_downsample_shape_mean_and_chunking(clean):
    low = blur_downsample_xy(clean, 4)
    assert low.shape == (24, 24, 24) and low.dtype == np.float32
    assert low.mean() == pytest.approx(clean.mean(), abs=0.01)
    assert low.std() < clean.std()  # blur removes the fine texture
    odd = blur_downsample_xy(clean[:, :95, :94], 3)
    assert odd.shape == (24, 31, 31)
    flat = np.full((2, 12, 12), 0.25, np.float32)
    np.testing.assert_allclose(blur_downsample_xy(flat, 2), 0.25, atol=1e-6)
    lazy = degrade_volume(da.from_array(clean, chunks=(5, 30, 41)), "super-resolve", factor=4)
    assert lazy.shape == low.shape
    np.testing.assert_allclose(lazy.compute(), low, atol=1e-6)


def test_subsample_z_is_slab_mean(clean):
    sub = subsample_z(clean, 4)
    assert sub.shape == (6, 96, 96) and sub.dtype == np.float32
    for j in range(6):
        np.testing.assert_allclose(sub[j], clean[4 * j : 4 * j + 4].mean(axis=0), atol=1e-6)
    assert subsample_z(clean[:23], 4).shape == (5, 96, 96)  # the partial slab is dropped
    lazy = degrade_volume(da.from_array(clean, chunks=(5, 50, 96)), "isotropic", factor=4)
    np.testing.assert_allclose(lazy.compute(), sub, atol=1e-6)


def test_degraded_grid_conventions():
    assert degraded_grid("denoise", (8, 8, 8)) == ((8, 8, 8), (0, 0, 0))
    assert degraded_grid("super-resolve", (8, 8, 8), factor=4) == ((8, 32, 32), (0, 12, 12))
    assert degraded_grid("isotropic", (8, 8, 8), factor=4) == ((32, 8, 8), (12, 0, 0))
    with pytest.raises(ValueError):
        degrade_volume(da.zeros((4, 4, 4)), "sharpen")
