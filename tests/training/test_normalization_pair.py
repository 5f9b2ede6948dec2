"""Separate intensity ranges for a model's condition and its target (issue 14, part 1).

A low-dose noisy image spans far more than its clean target; one range computed from both
squeezed the target into a corner of [-1, 1] and biased every sampler's output. These tests
fail on the code before the split: the target's patches must span [-1, 1], the checkpoint
must record both ranges, resuming and old checkpoints must keep their single range, and the
Enhancer must map raw input with the condition's range and outputs with the target's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emdiffuse.models.checkpoints import load_checkpoint, save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.normalization import (
    Normalization,
    as_pair,
    condition_from_model,
    pair_from_model,
    robust_range,
)
from emdiffuse.models.presets import make_config
from emdiffuse.models.variants import ModelConfig
from emdiffuse.training import trainer
from emdiffuse.training.augment import NONE, Augment, condition_jitter
from emdiffuse.training.demo_model import enhance_slices
from emdiffuse.training.loader import PatchDataset

FAST = dict(
    size="tiny", batch_size=2, patch=16, lr=1e-3, warmup=2, val_every=1000, val_batch=2,
    val_steps=2, progress=False, region=32, val_fraction=0.25, device="cpu",
    calibration_patches=4, fit_steps=0,
)  # fmt: skip


def _smooth(shape, seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    clean = gaussian_filter(rng.random(shape), (0, 2, 2))
    return ((clean - clean.min()) / (clean.max() - clean.min())).astype(np.float32)


@pytest.fixture(scope="module")
def wide_pair():
    """(noisy, clean): the noisy source spans about twice the clean range."""
    clean = _smooth((4, 64, 64), 0)
    rng = np.random.default_rng(1)
    noisy = clean + rng.normal(0.0, 0.35, clean.shape).astype(np.float32)
    return noisy, clean


def test_denoise_target_patches_span_the_model_range(wide_pair):
    noisy, clean = wide_pair
    noisy_range, clean_range = robust_range(noisy), robust_range(clean)
    assert noisy_range.high - noisy_range.low > 1.8 * (clean_range.high - clean_range.low)
    ds = PatchDataset("denoise", [noisy, clean], 32, augment=NONE, val_fraction=0.0, seed=3)
    # each side's range comes from its own source
    assert ds.condition_normalization == pytest.approx(noisy_range.to_dict(), rel=0.05, abs=0.02)
    assert ds.normalization == pytest.approx(clean_range.to_dict(), rel=0.05, abs=0.02)
    batch = ds.batch(range(16))
    target, cond = batch["target"].numpy(), batch["cond"].numpy()
    # the clean target fills [-1, 1] (one shared range left it in about [-0.5, 0.5])
    assert target.min() < -0.9 and target.max() > 0.9
    assert cond.min() < -0.9 and cond.max() > 0.9
    # and it is the clean data, mapped affinely by its own range
    key = int(batch["key"][0])
    sample = ds.sample(key)
    region = ds.footprint_of(sample)
    raw = clean[region]
    np.testing.assert_allclose(sample["target"].numpy(), ds._norm.forward(raw, clip=True), atol=1e-6)


def test_single_volume_recipes_use_one_range_for_both():
    vol = _smooth((9, 48, 48), 4)
    ds = PatchDataset("isotropic", [vol], 16, factor=2, augment=NONE, val_fraction=0.0)
    assert ds.condition_normalization == ds.normalization


def test_given_normalization_single_or_pair():
    vol = _smooth((2, 32, 32), 5)
    pair = [vol * 2.0, vol]
    one = {"low": 0.0, "high": 2.0}
    ds = PatchDataset("denoise", pair, 16, normalization=one, val_fraction=0.0)
    assert ds.condition_normalization == ds.normalization == one
    two = {"condition": {"low": 0.0, "high": 2.0}, "target": {"low": 0.0, "high": 1.0}}
    ds = PatchDataset("denoise", pair, 16, normalization=two, augment=NONE, val_fraction=0.0)
    assert ds.condition_normalization == two["condition"] and ds.normalization == two["target"]
    s = ds.sample(0)
    np.testing.assert_allclose(s["cond"].numpy(), s["target"].numpy(), atol=1e-6)


def test_as_pair_and_config_pair():
    a, b = Normalization(0.0, 4.0), Normalization(1.0, 2.0)
    assert as_pair({"low": 0.0, "high": 4.0}) == (a, a)
    assert as_pair({"condition": a.to_dict(), "target": b.to_dict()}) == (a, b)
    assert as_pair((a, b)) == (a, b)
    old = make_config("emdiffuse-n", "tiny", normalization={"low": 1.0, "high": 2.0})
    assert old.condition_normalization is None
    assert pair_from_model(old) == (b, b)  # None: the same range for both (older models)
    new = old.replace(condition_normalization={"low": 0.0, "high": 4.0})
    assert pair_from_model(new) == (a, b) and as_pair(new) == (a, b)
    assert condition_from_model(new) == a and Normalization.of(new) == b
    # a config written before the field existed reads as before
    data = json.loads(old.to_json())
    data.pop("condition_normalization", None)
    assert ModelConfig.from_dict(data).condition_normalization is None
    assert ModelConfig.from_json(new.to_json()) == new


def test_checkpoint_records_both_ranges_and_resume_keeps_them(tmp_path, wide_pair):
    noisy, clean = wide_pair
    out = tmp_path / "run"
    path = trainer.train("denoise", [noisy, clean], out, steps=4, ckpt_every=2, **FAST)
    config, _ = load_checkpoint(path)
    cond, target = pair_from_model(config)
    assert target.to_dict() == pytest.approx(robust_range(clean).to_dict(), rel=0.05, abs=0.02)
    assert cond.to_dict() == pytest.approx(robust_range(noisy).to_dict(), rel=0.05, abs=0.02)
    state = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert state["normalization"] == config.normalization
    assert state["condition_normalization"] == config.condition_normalization
    # a resumed run keeps the stored pair, even on other data
    path = trainer.train("denoise", [noisy * 3, clean * 3], out, steps=6, ckpt_every=2,
                         resume=True, **FAST)  # fmt: skip
    resumed, _ = load_checkpoint(path)
    assert pair_from_model(resumed) == (cond, target)


def test_resume_of_a_run_from_before_the_split_keeps_its_single_range(tmp_path, wide_pair):
    noisy, clean = wide_pair
    out = tmp_path / "run"
    trainer.train("denoise", [noisy, clean], out, steps=2, ckpt_every=2, **FAST)
    ckpt = out / "checkpoints" / "step_00000002.pt"
    state = torch.load(ckpt, weights_only=True)
    old = {"low": -1.0, "high": 2.0}
    state["normalization"] = old
    del state["condition_normalization"]
    torch.save(state, ckpt)
    path = trainer.train("denoise", [noisy, clean], out, steps=4, ckpt_every=2, resume=True,
                         **FAST)  # fmt: skip
    config, _ = load_checkpoint(path)
    assert config.normalization == old and config.condition_normalization == old


def test_train_accepts_the_pair(tmp_path, wide_pair):
    noisy, clean = wide_pair
    pair = {"condition": {"low": -1.0, "high": 2.0}, "target": {"low": 0.0, "high": 1.0}}
    path = trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=1, normalization=pair,
                         **FAST)  # fmt: skip
    config, _ = load_checkpoint(path)
    assert config.condition_normalization == pair["condition"]
    assert config.normalization == pair["target"]


def test_enhancer_maps_input_and_output_through_their_own_ranges(tmp_path):
    """With ``mean_init="input"`` a residual model's mean network starts at "output = input" in RAW units (its skip
    carries the condition's model space into the target's, its correction is zero), so with
    each side in its own range an untrained model returns the noisy input itself, clipped to
    the target's range; a shared range, or either range used on the wrong side, lands far
    off (an identity in model space would shrink the input into the target's range)."""
    clean = _smooth((4, 64, 64), 7) * 0.8 + 0.1
    noisy = clean + np.random.default_rng(3).normal(0.0, 0.3, clean.shape)
    path = trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=1, objective="residual",
                         mean_init="input", **{**FAST, "lr": 1e-6})  # fmt: skip
    enhancer = Enhancer.load(path)
    assert enhancer.condition_normalization != enhancer.normalization
    out = enhance_slices(enhancer, noisy, samples=0)
    target, condition = enhancer.normalization, enhancer.condition_normalization
    inside = np.clip(noisy, condition.low, condition.high)  # the condition is clipped too
    np.testing.assert_allclose(out, np.clip(inside, target.low, target.high), atol=0.01)
    # the checkpoint written by save_checkpoint reads back the same pair
    save_checkpoint(tmp_path / "copy.safetensors", enhancer.net.state_dict(), enhancer.config)
    copy = Enhancer.load(tmp_path / "copy.safetensors")
    assert pair_from_model(copy.config) == pair_from_model(enhancer.config)


def test_untrained_mean_starts_at_the_least_squares_shrinkage(tmp_path):
    """By default the mean network's skip starts at the best per-voxel affine predictor of
    the training patches. At a low signal-to-noise ratio that is a strong shrinkage of the
    noisy input towards the clean mean, so an untrained model already beats its input by
    far and keeps the mean intensity; the identity start returned the noisy input itself,
    which a few hundred steps could not unlearn (FlyEM at 2 e⁻/px, issue 14)."""
    clean = _smooth((4, 64, 64), 7) * 0.8 + 0.1
    noisy = clean + np.random.default_rng(3).normal(0.0, 0.3, clean.shape)
    path = trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=1, objective="residual",
                         **{**FAST, "lr": 1e-6})  # fmt: skip
    enhancer = Enhancer.load(path)
    out = enhance_slices(enhancer, noisy, samples=0)
    condition = enhancer.condition_normalization
    inside = np.clip(noisy, condition.low, condition.high)  # what the network sees
    slope, intercept = np.polyfit(inside.ravel(), clean.ravel(), 1)  # over the whole volume
    assert 0.05 < slope < 0.5, slope  # a shrinkage, not the input
    np.testing.assert_allclose(out, slope * inside + intercept, atol=0.03)
    mse_out, mse_in = np.mean((out - clean) ** 2), np.mean((noisy - clean) ** 2)
    assert mse_out < 0.5 * mse_in, (mse_out, mse_in)
    assert abs(out.mean() - clean.mean()) < 0.01 * np.ptp(clean)



def test_a_wide_skip_starts_at_the_wiener_filter_of_the_training_data(tmp_path):
    """``mean_net.skip_size`` 5: the untrained mean network is the least-squares 5×5 linear
    filter of the training pairs, which on smooth structure under noise averages
    neighbours and so beats the per-voxel shrinkage by far, mean intensity kept; the
    checkpoint records the width and an old config without it reads as 1×1."""
    from emdiffuse.models.checkpoints import load_checkpoint
    from emdiffuse.models.mean_net import MeanNetConfig

    clean = _smooth((4, 64, 64), 7) * 0.8 + 0.1
    noisy = clean + np.random.default_rng(3).normal(0.0, 0.3, clean.shape)
    outs = {}
    for size in (1, 5):
        path = trainer.train("denoise", [noisy, clean], tmp_path / f"s{size}", steps=1,
                             objective="residual", mean_net={"skip_size": size},
                             **{**FAST, "lr": 1e-6})  # fmt: skip
        config, state = load_checkpoint(path)
        assert config.mean_net.skip_size == size
        assert state["mean.skip.weight"].shape == (1, 1, size, size)
        outs[size] = enhance_slices(Enhancer.load(path), noisy, samples=0)
    mse = {size: float(np.mean((out - clean) ** 2)) for size, out in outs.items()}
    assert mse[5] < 0.6 * mse[1], mse
    assert abs(outs[5].mean() - clean.mean()) < 0.01 * np.ptp(clean)
    old = {k: v for k, v in config.mean_net.to_dict().items() if k != "skip_size"}
    assert MeanNetConfig.from_dict(old).skip_size == 1


def test_the_skip_is_fitted_on_unaugmented_patches_and_kept_fixed(tmp_path):
    """Data whose target is its condition moved one voxel along x: the least-squares 3×3
    skip is that shift (fitted on patches as read; the training flips and rotations would
    have spread it over the four neighbours), and training keeps it while the network body
    moves. Started at the input (``mean_init="input"``) the skip trains as before."""
    from emdiffuse.models.checkpoints import load_checkpoint

    clean = np.random.default_rng(5).random((4, 64, 64)).astype(np.float32)
    moved = np.roll(clean, 1, axis=2)  # target[x] = condition[x + 1]
    skips, bodies = {}, {}
    for name, steps, init in (("fit", 1, "least-squares"), ("trained", 4, "least-squares"),
                              ("input", 1, "input"), ("input-trained", 4, "input")):
        path = trainer.train("denoise", [moved, clean], tmp_path / name, steps=steps,
                             objective="residual", mean_net={"skip_size": 3}, mean_init=init,
                             **{**FAST, "lr": 1e-2, "ema_decay": 0.0})  # fmt: skip
        state = load_checkpoint(path)[1]
        skips[name], bodies[name] = state["mean.skip.weight"][0, 0], state["mean.out.weight"]
    w = skips["fit"]
    assert w[1, 2] > 0.95 and (w.abs().sum() - w[1, 2]) < 0.05, w
    torch.testing.assert_close(skips["trained"], w, rtol=0, atol=0)
    assert not torch.equal(bodies["trained"], bodies["fit"])
    assert not torch.equal(skips["input-trained"], skips["input"])

def test_intensity_jitter_is_one_raw_change_for_condition_and_target():
    """A perfect pair (condition = target in raw units) normalised with two different ranges
    stays a perfect pair in raw units after the gain/offset jitter. Before the fix the jitter
    was the same model-space map on both: it shifted the condition, whose range is twice as
    wide, by twice as many raw units as its target."""
    vol = 0.1 + 0.8 * _smooth((2, 48, 48), 7)  # inside both ranges: nothing is clipped
    ranges = {"condition": {"low": -0.5, "high": 1.5}, "target": {"low": 0.0, "high": 1.0}}
    spec = Augment(flips=False, rotations=False, scale=0.2, offset=0.2)
    ds = PatchDataset("denoise", [vol, vol], 16, normalization=ranges, augment=spec,
                      val_fraction=0.0, seed=2)  # fmt: skip
    cond_norm, target_norm = (Normalization.of(ranges[side]) for side in ("condition", "target"))
    moved = 0.0
    for key in range(8):
        s = ds.sample(key)
        raw_cond = cond_norm.inverse(s["cond"].numpy())
        raw_target = target_norm.inverse(s["target"].numpy())
        np.testing.assert_allclose(raw_cond, raw_target, atol=1e-5)
        moved = max(moved, float(np.abs(raw_target - vol[ds.footprint_of(s)]).max()))
    assert moved > 0.02  # the jitter did change the intensities


def test_condition_jitter_maps_the_same_raw_change():
    cond, target = Normalization(-2.0, 6.0), Normalization(0.5, 1.5)
    scale, offset = 1.1, -0.07
    c_scale, c_offset = condition_jitter(scale, offset, cond, target)
    raw = np.linspace(0.4, 1.6, 7)
    via_target = target.inverse(scale * target.forward(raw) + offset)
    via_cond = cond.inverse(c_scale * cond.forward(raw) + c_offset)
    np.testing.assert_allclose(via_cond, via_target, atol=1e-6)
    assert condition_jitter(scale, offset, target, target) == pytest.approx((scale, offset))
