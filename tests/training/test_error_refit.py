"""The error head refitted to the final mean at the end of training (issue 14, part 4):
only the head moves, it fits the final mean's errors better than the head trained beside
the moving mean, and its seconds come out of a time-limited run's budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from emdiffuse.models.checkpoints import load_checkpoint
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.diffusion import error_nll
from emdiffuse.models.networks import build_network
from emdiffuse.training import trainer
from emdiffuse.training.build import build_config, build_dataset
from emdiffuse.training.error_refit import REFIT_BATCHES, refit_error_head
from emdiffuse.training.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(size="tiny", batch_size=4, patch=16, lr=2e-3, warmup=2, val_every=1000,
                val_batch=2, val_steps=2, region=32, val_fraction=0.25, calibration_patches=8,
                ema_decay=0.9, objective="residual", fit_steps=0)  # fmt: skip
FAST = dict(SETTINGS, progress=False, device="cpu")


@pytest.fixture(scope="module")
def pair() -> list[np.ndarray]:
    """A smooth volume whose noise is weak in the left half of every slice and strong in
    the right half: errors whose size the head can learn."""
    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((12, 64, 64)), (0, 2, 2)).astype(np.float32)
    clean = (clean - clean.min()) / np.ptp(clean)
    strength = np.where(np.arange(64) < 32, 0.02, 0.3)[None, None, :]
    noisy = (clean + rng.standard_normal(clean.shape) * strength).astype(np.float32)
    return [noisy, clean]


def _likelihood(net, dataset, config, keys) -> float:
    """The head's mean error likelihood of the mean's errors on training batches ``keys``."""
    batch = dataset.batch(keys, split="train")
    cond = upsample_xy(batch["cond"], config.xy_scale, config.cond_upsample)
    with torch.no_grad():
        mean = net.mean(cond)
        return float(error_nll(net.error(cond, mean), batch["target"] - mean))


def test_a_refit_moves_only_the_head_and_fits_the_means_errors(pair):
    s = TrainSettings.build("denoise", ["a", "b"], {**SETTINGS, "steps": 10})
    dataset = build_dataset(s, pair)
    config = build_config(s, dataset, None)
    torch.manual_seed(0)
    net = build_network(config).eval()
    mean_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("error.")}
    held_out = range(10_000, 10_064)  # keys the refit never draws
    before = _likelihood(net, dataset, config, held_out)
    record = refit_error_head(net, dataset, config, batch_size=8, steps=150,
                              device=torch.device("cpu"), autocast=None)  # fmt: skip
    assert REFIT_BATCHES < 150 and record.steps == 150 and record.nll_last < record.nll_first
    assert record.batches == REFIT_BATCHES  # cycled: each batch read and its mean computed once
    assert _likelihood(net, dataset, config, held_out) < before - 0.5
    for key, value in net.state_dict().items():
        if not key.startswith("error."):
            torch.testing.assert_close(value, mean_before[key], rtol=0, atol=0)
    assert not net.mean.training  # the mean network's mode is kept

    passed = float("-inf")  # a deadline already passed: nothing changes
    kept = {k: v.clone() for k, v in net.error.state_dict().items()}
    record = refit_error_head(net, dataset, config, batch_size=8, steps=150,
                              device=torch.device("cpu"), autocast=None, deadline=passed)  # fmt: skip
    assert record.steps == 0
    for key, value in net.error.state_dict().items():
        torch.testing.assert_close(value, kept[key], rtol=0, atol=0)


def test_training_refits_the_head_and_nothing_else(tmp_path, pair):
    """Two runs alike but for the refit end with the same mean and residual networks; the
    refitted head fits the final mean's errors better on batches neither saw."""
    plain = trainer.train("denoise", pair, tmp_path / "plain", steps=60, error_refit_steps=0,
                          **FAST)  # fmt: skip
    refit = trainer.train("denoise", pair, tmp_path / "refit", steps=60, error_refit_steps=200,
                          **FAST)  # fmt: skip
    (config, a), (_, b) = load_checkpoint(plain), load_checkpoint(refit)
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all(k.startswith("error.") for k in moved)
    s = TrainSettings.build("denoise", ["a", "b"], {**SETTINGS, "steps": 60})
    dataset = build_dataset(s, pair)
    held_out = range(10_000, 10_064)
    scores = []
    for state in (a, b):
        net = build_network(config).eval()
        net.load_state_dict(state)
        scores.append(_likelihood(net, dataset, config, held_out))
    assert scores[1] < scores[0]


def test_a_time_limit_keeps_the_refits_share(pair):
    def limit(**settings):
        s = TrainSettings.build("denoise", ["a", "b"], {**SETTINGS, **settings})
        return trainer.loop_time_limit(s, build_config(s, build_dataset(s, pair)))

    assert limit(time_limit=100.0) == pytest.approx(95.0)  # the default share, 5 %
    assert limit(time_limit=100.0, error_refit_share=0.2) == pytest.approx(80.0)
    assert limit(time_limit=100.0, error_refit_steps=0) == 100.0  # no refit: all of it
    assert limit(time_limit=100.0, mean_net={"error_channels": 0}) == 100.0  # no head
    assert limit(time_limit=100.0, objective="diffusion") == 100.0
    assert limit() is None


@pytest.mark.parametrize("bad", [{"error_refit_steps": -1}, {"error_refit_share": 1.0},
                                 {"error_refit_share": -0.1}])  # fmt: skip
def test_bad_refit_settings_are_refused(bad):
    from emdiffuse.errors import InputError

    with pytest.raises(InputError, match=next(iter(bad))):
        TrainSettings.build("denoise", ["a", "b"], {**SETTINGS, **bad})
