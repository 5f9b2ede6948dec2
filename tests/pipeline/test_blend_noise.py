"""Blend window, counter-based tile noise and global normalisation."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from reference_blend import Accumulator

from emdiffuse.errors import InputError
from emdiffuse.models.normalization import Normalization, from_model, to_dtype
from emdiffuse.pipeline.blend import window_1d, window_2d
from emdiffuse.pipeline.intensity import sample_percentiles
from emdiffuse.pipeline.noise import INITIAL_STEP, noise_key, tile_noise


@pytest.mark.parametrize("tile,overlap", [(16, 4), (32, 8), (8, 0), (9, 5), (64, 32)])
def test_window_positive_symmetric_flat_middle(tile, overlap):
    w = window_1d(tile, overlap)
    assert w.shape == (tile,)
    assert (w > 0).all() and (w <= 1).all()
    np.testing.assert_allclose(w, w[::-1])
    ramp = min(overlap, tile // 2)
    assert (w[ramp : tile - ramp] == 1).all()
    assert (np.diff(w[:ramp]) > 0).all()  # rising smoothly to the flat part
    assert window_2d(tile, overlap).shape == (tile, tile)


def test_regular_overlap_already_sums_to_one():
    # with stride tile - overlap the two ramps of neighbours add to exactly one
    tile, overlap = 16, 6
    w = window_1d(tile, overlap)
    np.testing.assert_allclose(w[tile - overlap :] + w[:overlap], 1.0, atol=1e-12)


def test_accumulator_normalises_and_crops():
    acc = Accumulator(((0, 1), (0, 10), (0, 10)))
    win = window_2d(8, 4)
    acc.add(((0, 1), (0, 8), (0, 8)), np.full((1, 8, 8), 2.0), win)
    acc.add(((0, 1), (2, 10), (2, 10)), np.full((1, 8, 8), 4.0), win)
    out = acc.result()
    assert out[0, 0, 0] == 2.0 and out[0, 9, 9] == 4.0
    assert np.isnan(out[0, 9, 0]) and np.isnan(out[0, 0, 9])  # covered by no tile
    finite = out[np.isfinite(out)]
    assert ((finite >= 2.0) & (finite <= 4.0)).all()
    assert 2.0 < out[0, 5, 5] < 4.0
    # a tile entirely outside the box is ignored; a tile larger than its box is cropped
    acc.add(((0, 1), (20, 28), (0, 8)), np.full((1, 8, 8), 9.0), win)
    assert (acc.result()[np.isfinite(out)] < 9).all()


def test_tile_noise_deterministic_and_keyed():
    shape = (2, 8, 8)
    base = tile_noise(3, 0, (1, 16, 32), INITIAL_STEP, shape)
    assert base.dtype == np.float32 and base.shape == shape
    np.testing.assert_array_equal(base, tile_noise(3, 0, (1, 16, 32), INITIAL_STEP, shape))
    variants = [
        tile_noise(4, 0, (1, 16, 32), INITIAL_STEP, shape),  # seed
        tile_noise(3, 1, (1, 16, 32), INITIAL_STEP, shape),  # sample
        tile_noise(3, 0, (2, 16, 32), INITIAL_STEP, shape),  # z
        tile_noise(3, 0, (1, 17, 32), INITIAL_STEP, shape),  # y
        tile_noise(3, 0, (1, 16, 33), INITIAL_STEP, shape),  # x
        tile_noise(3, 0, (1, 16, 32), 0, shape),  # step
    ]
    for v in variants:
        assert not np.allclose(v, base)
    assert not np.array_equal(noise_key(0, 0, (0, 0, 1), 0), noise_key(0, 0, (0, 1, 0), 0))
    big = tile_noise(0, 0, (0, 0, 0), 5, (64, 64, 64))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_normalization_round_trip_and_dtype():
    norm = Normalization(10.0, 250.0)
    raw = np.array([10.0, 130.0, 250.0])
    np.testing.assert_allclose(norm.forward(raw), [-1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(norm.inverse(norm.forward(raw)), raw, atol=1e-4)
    assert norm.scale_std(np.array([1.0]))[0] == pytest.approx(120.0)
    out = to_dtype(np.array([-5.0, 12.4, 12.6, 300.0]), np.uint8)
    assert out.dtype == np.uint8 and out.tolist() == [0, 12, 13, 255]
    assert to_dtype(np.array([1.5]), np.float32).dtype == np.float32
    with pytest.raises(InputError):
        Normalization(5.0, 5.0)


def test_from_model_reads_mapping_or_object():
    class Cfg:
        normalization = {"low": 1.0, "high": 3.0}

    assert from_model(Cfg()) == Normalization(1.0, 3.0)

    class NoNorm:
        normalization = None

    with pytest.raises(InputError, match="normalize='auto'"):
        from_model(NoNorm())


def test_sample_percentiles_seeded_and_chunk_sampled():
    rng = np.random.default_rng(0)
    arr = da.from_array(rng.normal(100, 10, size=(8, 64, 64)), chunks=(2, 32, 32))
    a = sample_percentiles(arr, n_chunks=5, seed=1)
    b = sample_percentiles(arr, n_chunks=5, seed=1)
    assert a == b
    assert 60 < a.low < 80 and 120 < a.high < 140
    with pytest.raises(InputError, match="no contrast"):
        sample_percentiles(da.zeros((4, 8, 8), chunks=4))
