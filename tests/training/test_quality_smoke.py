"""The regression objective of the trainer (the CARE-style baseline of benchmarks/quality).

A regression run trains every sample at the noisiest level of the schedule with x0
prediction and an L1 loss, and its checkpoint runs through the Enhancer in one step.
Tiny real models on small real arrays; a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.training import trainer
from emdiffuse.training.build import build_config, build_dataset, build_net
from emdiffuse.training.settings import TrainSettings
from emdiffuse.training.step import keyed_noise, train_step

FAST = dict(
    size="tiny", batch_size=2, patch=16, lr=1e-3, warmup=2, val_every=1000, val_batch=2,
    progress=False, region=32, val_fraction=0.25, device="cpu", ckpt_every=1000,
)  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((4, 64, 64)), (0, 2, 2)).astype(np.float32)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    return [noisy, clean]


def test_regression_step_is_l1_on_x0_at_the_noisiest_level(tmp_path, pair):
    """The loss of a regression training step is the L1 error of the network's direct x0
    prediction with the noisy-target channel at the schedule's noisiest level."""
    from emdiffuse.models import diffusion

    s = TrainSettings(task="denoise", data=[], objective="regression", prediction="x0",
                      loss="l1", patch=16, batch_size=2, region=32, val_fraction=0.25)  # fmt: skip
    dataset = build_dataset(s, pair)
    config = build_config(s, dataset)
    schedule = diffusion.Schedule.from_dict(dict(config.schedule))
    net = build_net(config, seed=0)
    batch = dataset.batch(range(2))
    noise, _ = keyed_noise(batch["key"].tolist(), batch["target"].shape[1:], s.seed)
    top = schedule.alpha_bars[-1].float().expand(2)  # the noisiest level, first sampler step
    with torch.no_grad():
        x_t = diffusion.q_sample(batch["target"], top, noise)
        pred = net(torch.cat([batch["cond"], x_t], dim=1), top, None)
        expected = float(torch.nn.functional.l1_loss(pred, batch["target"]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss, _ = train_step(net, net, optimizer, batch, schedule, config, s,
                         torch.device("cpu"), None)  # fmt: skip
    assert loss == pytest.approx(expected, rel=1e-4)


def test_regression_run_writes_an_x0_l1_checkpoint_that_runs_in_one_step(tmp_path, pair):
    from emdiffuse.models.enhancer import Enhancer

    # prediction="v" is overridden: a regression model always predicts x0 with L1
    path = trainer.train("denoise", pair, tmp_path / "reg", steps=6, objective="regression",
                         prediction="v", **FAST)  # fmt: skip
    settings = json.loads((tmp_path / "reg" / "settings.json").read_text())
    assert settings["objective"] == "regression" and settings["val_steps"] == 1
    enhancer = Enhancer.load(path, expect_task="denoise", precision="fp32")
    assert enhancer.config.prediction == "x0" and enhancer.config.loss == "l1"
    cond = np.zeros((1, 1, 16, 16), np.float32)
    noise = np.random.default_rng(1).standard_normal((1, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():  # one step of any sampler returns the network's x0 at the top level
        top = enhancer.schedule.alpha_bars[-1].float().expand(1)
        direct = enhancer.net(torch.cat([torch.from_numpy(cond), torch.from_numpy(noise)], 1),
                              top, None).clamp(-1, 1).numpy()  # fmt: skip
    for sampler in ("ddim", "dpmpp_2m"):
        out = enhancer.enhance(cond, noise, sampler=sampler, steps=1)
        np.testing.assert_allclose(out, direct, atol=1e-5)
    with pytest.raises(InputError, match="objective"):
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, objective="care", **FAST)
    with pytest.raises(InputError, match="objective"):  # resume must keep the objective
        trainer.train("denoise", pair, tmp_path / "reg", steps=8, resume=True,
                      prediction="x0", objective="diffusion", **FAST)  # fmt: skip
