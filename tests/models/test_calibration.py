"""Conformal calibration of the sample spread (issue 14, part 4): real arrays, no mocks.

The finite-sample quantile rule, coverage on synthetic exchangeable data, the Student-t
quantile, the correction for a number of samples other than the calibration's, and the
record a model config stores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from emdiffuse.errors import InputError
from emdiffuse.models import calibration
from emdiffuse.models.presets import make_config


def test_finite_sample_rule():
    scores = np.arange(1.0, 10.0)  # 9 scores: 1..9
    # ceil((n + 1) * level)-th smallest
    assert calibration.conformal_quantile(scores, 0.9) == 9.0  # ceil(9.0) = 9
    assert calibration.conformal_quantile(scores, 0.5) == 5.0  # ceil(5.0) = 5
    assert calibration.conformal_quantile(scores, 0.51) == 6.0  # ceil(5.1) = 6
    assert calibration.conformal_quantile(scores[:8], 0.9) == math.inf  # ceil(8.1) = 9 > 8
    assert calibration.conformal_quantile(scores[::-1], 0.1) == 1.0  # order does not matter
    assert calibration.conformal_quantile(np.append(scores, np.nan), 0.5) == 5.0  # NaN ignored
    with pytest.raises(InputError):
        calibration.conformal_quantile(scores, 1.0)
    with pytest.raises(InputError):
        calibration.conformal_quantile(np.array([]), 0.9)


@pytest.mark.parametrize("n", [19, 99])
def test_marginal_coverage_on_exchangeable_data(n):
    """Over many draws of (n calibration scores, 1 test score), the test score is at or below
    the quantile with probability in [level, level + 1/(n+1)] (continuous scores)."""
    rng = np.random.default_rng(0)
    level, trials = 0.9, 20000
    scores = rng.standard_exponential((trials, n + 1)) * rng.uniform(0.5, 2.0, (trials, 1))
    k = math.ceil((n + 1) * level)
    q = np.sort(scores[:, :n], axis=1)[:, k - 1]
    assert q[0] == calibration.conformal_quantile(scores[0, :n], level)
    covered = np.mean(scores[:, n] <= q)
    tol = 3 * math.sqrt(level * (1 - level) / trials)
    assert level - tol <= covered <= level + 1 / (n + 1) + tol


def test_t_quantile_known_values():
    # two-sided 90 %: the one-sided 95 % point of Student's t
    for dof, expected in [(1, 6.313752), (2, 2.919986), (3, 2.353363), (7, 1.894579),
                          (30, 1.697261)]:  # fmt: skip
        assert calibration.t_quantile(0.9, dof) == pytest.approx(expected, abs=1e-5)
    assert calibration.t_quantile(0.5, 1) == pytest.approx(1.0, abs=1e-9)  # tan(pi/4)
    assert calibration.t_quantile(0.95, 10_000) == pytest.approx(1.959964, abs=1e-3)


def _draws(rng, n, voxels, bias=0.7, spread=0.6):
    """Truth ~ N(0, tau^2) per voxel (tau varies); the model's mean is off by bias*tau and
    its n samples spread by spread*tau around it (under-dispersed, as real models are)."""
    tau = np.exp(rng.normal(0.0, 0.5, voxels))
    truth = tau * rng.standard_normal(voxels)
    centre = bias * tau * rng.standard_normal(voxels)
    samples = centre + spread * tau * rng.standard_normal((n, voxels))
    return samples, truth


def test_fit_and_coverage_on_held_out_voxels():
    rng = np.random.default_rng(1)
    samples, truth = _draws(rng, 4, 50_000)
    record = calibration.fit(samples, truth, level=0.9)
    assert record["samples"] == 4 and record["level"] == 0.9
    assert record["coverage"] >= 0.9 and record["voxels"] == 50_000
    assert record["scale"] > 2.0  # the raw spread is far too narrow for 90 %
    assert record["spearman"] > 0.2
    make_config("emdiffuse-n", "tiny").replace(calibration=record)  # a valid config field
    # fresh voxels: the stored scale holds at the calibration's N
    samples, truth = _draws(rng, 4, 200_000)
    hw = calibration.half_widths(samples.std(0), record, 4)
    covered = np.mean(np.abs(samples.mean(0) - truth) <= hw)
    assert abs(covered - 0.9) < 0.01


@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_other_numbers_of_samples_keep_the_level(n):
    rng = np.random.default_rng(2)
    record = calibration.fit(*_draws(rng, 4, 100_000), level=0.9)
    samples, truth = _draws(rng, n, 200_000)
    hw = calibration.half_widths(samples.std(0), record, n)
    covered = np.mean(np.abs(samples.mean(0) - truth) <= hw)
    assert abs(covered - 0.9) < 0.015
    # the spread's mean bias alone (E std_N = b(N) sigma) does not: it misses by more
    b = [math.sqrt(2 / m) * math.exp(math.lgamma(m / 2) - math.lgamma((m - 1) / 2)) for m in (4, n)]
    naive = record["scale"] * samples.std(0) * b[0] / b[1]
    assert abs(np.mean(np.abs(samples.mean(0) - truth) <= naive) - 0.9) > 0.03


def test_half_widths_floor_units_and_refusals():
    record = {"level": 0.9, "scale": 3.0, "samples": 4, "floor": 0.01, "excess": 0.5}
    std = np.array([0.0, 0.005, 0.1], dtype=np.float32)
    np.testing.assert_allclose(calibration.half_widths(std, record, 4), [0.03, 0.03, 0.3],
                               rtol=1e-6)  # fmt: skip
    # raw units: std and floor scale together
    np.testing.assert_allclose(calibration.half_widths(std * 50, record, 4, scale=50),
                               [1.5, 1.5, 15.0], rtol=1e-6)  # fmt: skip
    assert calibration.half_widths(std, record, 8)[2] < 0.3 < calibration.half_widths(std, record, 2)[2]
    with pytest.raises(InputError, match="at least 2"):
        calibration.half_widths(std, record, 1)
    with pytest.raises(InputError, match="calibration"):
        make_config("emdiffuse-n", "tiny").replace(calibration={"level": 0.9})


def test_residual_correlation_of_samples():
    """How much N samples' residual parts share: 1 for one texture drawn N times, about 0
    for independent ones, the shared variance's fraction for a mix; stored and checked with
    the calibration."""
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((1, 8, 32, 32))
    independent = rng.standard_normal((4, 8, 32, 32))
    assert calibration.residual_correlation(np.repeat(shared, 3, axis=0)) == pytest.approx(1.0)
    assert abs(calibration.residual_correlation(independent)) < 0.02
    mix = np.sqrt(0.3) * shared + np.sqrt(0.7) * independent
    assert calibration.residual_correlation(mix) == pytest.approx(0.3, abs=0.03)
    assert calibration.residual_correlation(np.stack([shared[0], -shared[0]])) == 0.0  # clipped
    assert calibration.residual_correlation(np.zeros((2, 4, 4))) == 0.0  # no texture at all
    with pytest.raises(InputError, match="at least 2"):
        calibration.residual_correlation(shared)
    record = {"level": 0.9, "scale": 3.0, "samples": 4, "floor": 0.01}
    make_config("emdiffuse-n", "tiny").replace(calibration={**record, "residual_correlation": 0.3})
    with pytest.raises(InputError, match="residual_correlation"):
        make_config("emdiffuse-n", "tiny").replace(calibration={**record, "residual_correlation": 1.5})


def test_the_error_heads_scale_holds_on_held_out_voxels():
    """``fit_mean``: errors drawn with a σ that varies 10× over the voxels, a head that
    predicts σ only up to a factor 2 (so the scale has work to do): the fitted intervals
    cover about 90 % of fresh voxels, and rank the errors as σ does."""
    rng = np.random.default_rng(0)
    sigma = np.exp(rng.uniform(np.log(0.01), np.log(0.1), size=20000))
    truth = rng.uniform(-1, 1, size=sigma.shape)
    mean = truth + sigma * rng.standard_normal(sigma.shape)
    record = calibration.fit_mean(mean, 0.5 * sigma, truth)
    assert record["level"] == 0.9 and record["coverage"] >= 0.9
    assert 2 * 1.6 < record["scale"] < 2 * 1.7  # the Gaussian 90 % point is 1.645 σ
    assert record["spearman"] > 0.3
    fresh = truth + sigma * rng.standard_normal(sigma.shape)
    widths = calibration.mean_half_widths(0.5 * sigma, record)
    assert abs(np.mean(np.abs(fresh - truth) <= widths) - 0.9) < 0.01
    with pytest.raises(InputError, match="differ"):
        calibration.fit_mean(mean, sigma[:10], truth)
    config = make_config("emdiffuse-n", "tiny", kind="residual")
    stored = {"level": 0.9, "scale": 1.7, "samples": 4, "floor": 1e-3, "mean_interval": record}
    config.replace(calibration=stored).validate()
    with pytest.raises(InputError, match="mean_interval lacks floor"):
        bad = {k: v for k, v in record.items() if k != "floor"}
        config.replace(calibration={**stored, "mean_interval": bad}).validate()


@pytest.mark.parametrize("level", [0.5, 0.68, 0.95, 0.99])
def test_other_stored_levels_hold_on_fresh_voxels(level):
    """One fit stores the scale at every level of ``INTERVAL_LEVELS``; picked with
    ``at_level``, each covers its own level of fresh voxels, at the calibration's N and at
    another, and the scales grow with the level."""
    rng = np.random.default_rng(3)
    record = calibration.fit(*_draws(rng, 4, 100_000), level=0.9)
    stored = dict(map(tuple, record["scales"]))
    assert set(stored) == set(calibration.INTERVAL_LEVELS)
    assert stored[0.9] == record["scale"]
    assert list(stored.values()) == sorted(stored.values())  # wider for a higher level
    picked = calibration.at_level(record, level)
    assert picked["level"] == level and picked["scale"] == stored[level]
    assert record["level"] == 0.9  # the record itself is left as it was
    for n in (4, 8):
        samples, truth = _draws(rng, n, 200_000)
        hw = calibration.half_widths(samples.std(0), picked, n)
        covered = np.mean(np.abs(samples.mean(0) - truth) <= hw)
        assert abs(covered - level) < 0.015, (n, covered)


def test_at_level_refuses_a_level_not_stored_and_reads_older_records():
    rng = np.random.default_rng(4)
    sigma = np.exp(rng.uniform(-4, -2, size=5000))
    truth = rng.uniform(-1, 1, size=sigma.shape)
    mean = truth + sigma * rng.standard_normal(sigma.shape)
    head = calibration.fit_mean(mean, sigma, truth)
    stored = {"level": 0.9, "scale": 1.7, "samples": 4, "floor": 1e-3,
              "scales": [[0.9, 1.7], [0.95, 2.1]], "mean_interval": head}  # fmt: skip
    picked = calibration.at_level(stored, 0.95)
    assert (picked["level"], picked["scale"]) == (0.95, 2.1)
    assert picked["mean_interval"]["level"] == 0.95  # the error head's intervals follow
    assert picked["mean_interval"]["scale"] > head["scale"]
    assert calibration.levels(stored) == (0.9, 0.95)
    with pytest.raises(InputError, match=r"holds intervals at 90 %, 95 %, not at 97 %"):
        calibration.at_level(stored, 0.97)
    older = {"level": 0.9, "scale": 1.7, "samples": 4, "floor": 1e-3}  # before ``scales``
    assert calibration.levels(older) == (0.9,)
    assert calibration.at_level(older, 0.9)["scale"] == 1.7
    with pytest.raises(InputError, match="holds intervals at 90 %, not at 95 %"):
        calibration.at_level(older, 0.95)
    # 99 % needs at least 99 voxels: a small calibration leaves it out instead of failing
    few = calibration.fit_mean(mean[:50], sigma[:50], truth[:50])
    assert 0.99 not in calibration.levels(few) and 0.9 in calibration.levels(few)
    config = make_config("emdiffuse-n", "tiny")
    config.replace(calibration=stored).validate()
    for bad in ([[1.5, 2.0]], [[0.9]], [[0.9, -1.0]], [["0.9", 1.0]]):
        with pytest.raises(InputError, match="scales must be"):
            config.replace(calibration={**stored, "scales": bad}).validate()
