import math

import numpy as np
import pytest

from emdiffuse import metrics
from emdiffuse.errors import InputError


def _image(seed=0, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 7.0) + 0.05 * rng.random(shape)).astype(
        np.float32
    )


def test_psnr_identical_is_inf_and_known_noise():
    img = _image().astype(np.float64)
    assert metrics.psnr(img, img) == math.inf
    # constant error of 0.1 on a range of 1 -> exactly 20 dB
    assert metrics.psnr(img + 0.1, img, data_range=1.0) == pytest.approx(20.0, abs=1e-6)
    # gaussian noise sigma: PSNR ~ 20 log10(range / sigma)
    rng = np.random.default_rng(1)
    noisy = img + rng.normal(0, 0.05, img.shape)
    assert metrics.psnr(noisy, img, data_range=1.0) == pytest.approx(26.02, abs=0.3)
    assert metrics.psnr(noisy, img, data_range=2.0) == pytest.approx(32.04, abs=0.3)


def test_ssim_identical_and_noisy():
    img = _image()
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    noisy = img + np.random.default_rng(2).normal(0, 0.2, img.shape)
    assert metrics.ssim(noisy, img) < 0.8
    stack = np.stack([img, img])
    assert metrics.ssim(stack, stack) == pytest.approx(1.0)


@pytest.mark.parametrize("side", [4, 7, 8, 10, 11])
def test_ssim_of_patches_smaller_than_the_gaussian_window(side):
    """Validation patches of 7-10 voxels (``train --patch 8``) were scored with the 11-voxel
    Gaussian window and raised; they take a uniform window that fits."""
    img = _image()[:side, :side]
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    noisy = img + np.random.default_rng(3).normal(0, 0.3, img.shape)
    assert metrics.ssim(noisy, img) < 0.9


def test_frc_identical_is_one_and_noise_lowers_high_frequencies():
    img = _image(shape=(64, 64))
    freqs, corr = metrics.frc(img, img)
    assert len(freqs) == 32 and freqs[0] > 0 and freqs[-1] < 0.5
    np.testing.assert_allclose(corr, 1.0, atol=1e-9)
    noisy = img + np.random.default_rng(3).normal(0, 0.3, img.shape)
    _, c2 = metrics.frc(noisy, img)
    assert c2[-8:].mean() < 0.5 < c2[:3].mean()
    assert metrics.frc_resolution(img, img) == 0.5
    assert metrics.frc_resolution(noisy, img) < 0.5


def test_spectrum_error_zero_for_same_and_high_for_blur():
    from scipy.ndimage import gaussian_filter

    img = np.random.default_rng(4).random((64, 64))
    assert metrics.spectrum_error(img, img) == pytest.approx(0.0)
    blurred = gaussian_filter(img, 2.0)
    assert metrics.spectrum_error(blurred, img) > 1.0
    f, p = metrics.radial_power_spectrum(img)
    assert p.shape == f.shape == (32,)


def test_shape_mismatch_raises():
    with pytest.raises(InputError, match="shapes differ"):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)))


def test_calibration_of_a_calibrated_and_a_useless_uncertainty_map():
    rng = np.random.default_rng(5)
    truth = _image(shape=(128, 128)).astype(np.float64)
    sigma = 0.02 + 0.2 * rng.random(truth.shape)  # the real, varying error scale
    mean = truth + sigma * rng.standard_normal(truth.shape)
    good = metrics.calibration(mean, sigma, truth)
    assert good["coverage"] == pytest.approx(0.954, abs=0.01)  # Gaussian, k = 2
    assert good["spearman"] > 0.4 and good["pearson"] > 0.4
    assert good["rmse"] == pytest.approx(np.sqrt(np.mean(sigma**2)), rel=0.05)
    shuffled = rng.permutation(sigma.ravel()).reshape(sigma.shape)  # right scale, no info
    bad = metrics.calibration(mean, shuffled, truth)
    assert abs(bad["spearman"]) < 0.05 and abs(bad["pearson"]) < 0.05
    assert bad["coverage"] < good["coverage"]
    flat = metrics.calibration(mean, np.full(truth.shape, 0.1), truth)
    assert math.isnan(flat["spearman"]) and math.isnan(flat["pearson"])
    with pytest.raises(InputError, match="std"):
        metrics.calibration(mean, -sigma, truth)


def test_reliability_curve_follows_the_diagonal_when_calibrated():
    rng = np.random.default_rng(6)
    truth = np.zeros((64, 256))
    sigma = np.repeat(np.linspace(0.01, 0.5, 8), 64 * 256 // 8).reshape(truth.shape)
    mean = truth + sigma * rng.standard_normal(truth.shape)
    curve = metrics.reliability(mean, sigma, truth, bins=8)
    assert curve["count"].sum() == truth.size and len(curve["std"]) == 8
    np.testing.assert_allclose(curve["std"], np.linspace(0.01, 0.5, 8), rtol=1e-9)
    np.testing.assert_allclose(curve["rmse"], curve["std"], rtol=0.1)
    over = metrics.reliability(mean, 3 * sigma, truth, bins=8)  # over-cautious: 3x the real error
    assert np.all(over["rmse"] < over["std"])


def test_uncertainty_ranking_separates_voxel_and_region_scores_and_knows_its_ceiling():
    rng = np.random.default_rng(7)
    # The error scale varies by region (16 x 16 blocks), as a posterior's does between
    # membranes and cytoplasm; the map is exactly right.
    blocks = 0.02 + 0.2 * rng.random((2, 8, 8))
    sigma = np.kron(blocks, np.ones((16, 16)))
    truth = np.zeros(sigma.shape)
    mean = truth + sigma * rng.standard_normal(sigma.shape)
    good = metrics.uncertainty_ranking(mean, sigma, truth, window=16)
    assert good["window"] == 16
    # Per voxel a perfect map ranks the error only loosely; by region almost exactly.
    assert 0.3 < good["spearman"] < 0.7 and good["spearman_window"] > 0.9
    assert good["ceiling"] == pytest.approx(good["spearman"], abs=0.05)
    assert good["ceiling_window"] == pytest.approx(good["spearman_window"], abs=0.05)
    # The same values in the wrong places: no ranking, though the ceiling is unchanged.
    shuffled = np.kron(rng.permutation(blocks.ravel()).reshape(blocks.shape), np.ones((16, 16)))
    bad = metrics.uncertainty_ranking(mean, shuffled, truth, window=16)
    assert abs(bad["spearman_window"]) < 0.3 and bad["ceiling_window"] > 0.9
    flat = metrics.uncertainty_ranking(mean, np.full(sigma.shape, 0.1), truth)
    assert math.isnan(flat["spearman"]) and math.isnan(flat["ceiling_window"])
    with pytest.raises(InputError, match="window"):
        metrics.uncertainty_ranking(mean, sigma, truth, window=500)
