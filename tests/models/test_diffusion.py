"""Schedules, prediction targets, the training objective and EMA (emdiffuse.models.diffusion)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emdiffuse.errors import InputError
from emdiffuse.models import diffusion
from emdiffuse.models.diffusion import Schedule
from emdiffuse.models.ema import EMA


class TinyNet(nn.Module):
    """Follows the UNet contract: forward(cat([cond, x_t]), noise_level (B,), index)."""

    def __init__(self, in_ch: int = 2, out_ch: int = 1, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, out_ch, 3, padding=1),
        )  # fmt: skip
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, noise_level, index=None):
        level = noise_level.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.body(torch.cat([x, level.to(x.dtype)], dim=1))


@pytest.mark.parametrize("spec", [
    {"kind": "linear", "steps": 2000, "beta_start": 1e-6, "beta_end": 1e-2},
    {"kind": "cosine", "steps": 1000, "s": 0.008},
])  # fmt: skip
def test_schedule_endpoints_monotone_roundtrip(spec):
    s = Schedule.from_dict(spec)
    assert s.to_dict() == spec
    ab = s.alpha_bars
    assert ab.shape == (spec["steps"],)
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < 0.01 and ab[0] > 0.99
    assert float(s.alpha_bar(0.0)) == 1.0
    assert float(s.alpha_bar(1.0)) == pytest.approx(float(ab[-1]), rel=1e-9)
    for n in (1, 2, 7, 1000):
        ts = s.timesteps(n)
        assert ts.shape == (n + 1,)
        assert float(ts[-1]) == 1.0 and float(ts[0]) == pytest.approx(float(ab[-1]), rel=1e-9)
        assert torch.all(ts[1:] > ts[:-1])
    # n == steps gives exactly the training points
    full = s.timesteps(spec["steps"])
    assert torch.allclose(full[:-1].flip(0), ab, rtol=1e-9)
    for spacing in ("logsnr", "karras"):
        for n in (1, 2, 8):
            ts = s.timesteps(n, spacing)
            assert ts.shape == (n + 1,) and float(ts[-1]) == 1.0
            assert float(ts[0]) == pytest.approx(float(ab[-1]), rel=1e-9)
            assert torch.all(ts[1:] > ts[:-1])
    lam = torch.logit(s.timesteps(6, "logsnr")[:-1])
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(5), rtol=1e-6)


def test_linear_schedule_matches_reference_formula():
    s = Schedule("linear", 2000, 1e-6, 1e-2)
    betas = torch.linspace(1e-6, 1e-2, 2000, dtype=torch.float64)
    assert torch.allclose(s.alpha_bars, torch.cumprod(1 - betas, 0))


def test_bad_schedules_raise():
    with pytest.raises(InputError):
        Schedule("quadratic", 10)
    with pytest.raises(InputError):
        Schedule("linear", 10, 0.1, 0.01)
    with pytest.raises(InputError):
        Schedule.from_dict({"kind": "linear", "steps": 10, "bogus": 1})
    with pytest.raises(InputError):
        Schedule().timesteps(0)
    with pytest.raises(InputError):
        Schedule().timesteps(4, "quadratic")


def test_noise_level_between_neighbouring_points():
    s = Schedule("linear", 50, 1e-4, 0.2)
    ab = s.alpha_bars
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lv = s.sample_noise_level(4000, u=u).double()
    k = (u * 49).floor().long() + 1
    lo, hi = ab[k], ab[k - 1]
    assert torch.all(lv >= lo.float().double() - 1e-6) and torch.all(
        lv <= hi.float().double() + 1e-6
    )
    # every interval 1..49 is hit, never the one "before" index 0
    assert set(k.tolist()) == set(range(1, 50))
    g = torch.Generator().manual_seed(3)
    a1 = s.sample_noise_level(8, g)
    a2 = s.sample_noise_level(8, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and a1.dtype == torch.float32


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_prediction_conversions_invert(kind):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 8, 8, generator=g)
    a = torch.tensor([0.01, 0.5, 0.97], dtype=torch.float64)
    x_t = diffusion.q_sample(x0, a, eps)
    target = diffusion.target_for(x0, eps, a, kind)
    assert torch.allclose(diffusion.to_x0(target, x_t, a, kind), x0, atol=1e-4)
    assert torch.allclose(diffusion.to_eps(target, x_t, a, kind), eps, atol=1e-4)


@pytest.mark.parametrize("prediction,loss", [("eps", "mse"), ("x0", "l1"), ("v", "mse")])
def test_loss_falls_when_overfitting_one_batch(prediction, loss):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    cond = (x0 + 0.3 * torch.randn(x0.shape, generator=g)).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g)
    u = torch.rand(4, generator=g)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = Schedule("linear", 200, 1e-4, 0.05)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        val = diffusion.diffusion_loss(net, cond, x0, sched, prediction, loss, noise=noise, u=u)
        val.backward()
        opt.step()
        losses.append(float(val.detach()))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_loss_rejects_bad_names_and_uses_generator():
    net = TinyNet()
    x0 = torch.zeros(2, 1, 8, 8)
    with pytest.raises(InputError):
        diffusion.diffusion_loss(net, x0, x0, Schedule(), "score", "mse")
    with pytest.raises(InputError):
        diffusion.diffusion_loss(net, x0, x0, Schedule(), "eps", "huber")
    a = diffusion.diffusion_loss(
        net, x0, x0, Schedule(), generator=torch.Generator().manual_seed(5)
    )
    b = diffusion.diffusion_loss(
        net, x0, x0, Schedule(), generator=torch.Generator().manual_seed(5)
    )
    assert float(a.detach()) == float(b.detach())


def test_make_denoiser_feeds_alpha_bar_and_clips():
    seen = {}

    def net(x, level, index):
        seen["x"], seen["level"], seen["index"] = x, level, index
        return torch.full_like(x[:, 1:], 5.0)

    cond = torch.zeros(2, 1, 4, 4)
    idx = torch.tensor([0, 1])
    den = diffusion.make_denoiser(net, cond, Schedule(), "x0", index=idx)
    out = den(torch.ones(2, 1, 4, 4), 0.25)
    assert seen["x"].shape == (2, 2, 4, 4) and torch.equal(seen["x"][:, :1], cond)
    assert torch.allclose(seen["level"], torch.tensor([0.25, 0.25]))
    assert seen["index"] is idx
    assert torch.all(out == 1.0)
    raw = diffusion.make_denoiser(net, cond, None, "x0", clip=False)(torch.ones(2, 1, 4, 4), 0.25)
    assert torch.all(raw == 5.0)


def test_ema_tracks_parameters_and_buffers():
    net = TinyNet()
    ema = EMA(net, decay=0.5, warmup=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.calls.fill_(7.0)
    ema.update(net)
    copy = TinyNet()
    ema.copy_to(copy)
    for k, p in copy.named_parameters():
        assert torch.allclose(p, before[k] + 0.5)
    assert float(copy.calls) == 7.0
    state = ema.state_dict()
    ema2 = EMA(TinyNet(), decay=0.9)
    ema2.load_state_dict(state)
    assert ema2.decay == 0.5 and ema2.num_updates == 1
    for k in state["shadow"]:
        assert torch.equal(ema2.shadow[k], ema.shadow[k])
    with pytest.raises(InputError):
        EMA(net, decay=1.5)


def test_the_ema_copy_evaluates_as_enhance_does():
    """Validation and the end-of-training calibration sample with the EMA copy. It is in eval
    mode, as the Enhancer's network is: the "small" preset's residual UNet has dropout 0.1,
    which in train mode made two passes over the same input differ and fitted the
    calibration to noisier samples than ``enhance`` draws."""
    from emdiffuse.models.networks import build_network
    from emdiffuse.models.presets import make_config

    torch.manual_seed(0)
    net = build_network(make_config("emdiffuse-n", "small", kind="residual"))
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())
    ema = EMA(net, decay=0.9)
    assert not ema.module.training and net.training  # the live network still trains
    x = torch.randn(2, 3, 32, 32)
    level = torch.full((2,), 0.5)
    with torch.no_grad():
        a, b = ema.module.residual(x, level), ema.module.residual(x, level)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not ema.averaged().training
