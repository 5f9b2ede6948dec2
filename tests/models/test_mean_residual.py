"""The mean-plus-residual model kind and the Enhancer's mean / parts interface (issue 14).

Config checks and JSON, one checkpoint with ``mean.*`` and ``residual.*`` weights, the loss
(the diffusion part never moves the mean network), the Enhancer's ``posterior_mean`` /
``sample_parts`` / ``enhance`` contract for both kinds, and a tiny training run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from emdiffuse.errors import InputError
from emdiffuse.models import diffusion
from emdiffuse.models.checkpoints import check_state_dict, load_checkpoint, save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.mean_net import (
    ChannelNorm,
    MeanNetConfig,
    MeanUNet,
    least_squares_skip,
    skip_gains,
)
from emdiffuse.models.networks import MeanResidualNet, baseline_weights, build_network
from emdiffuse.models.presets import make_config
from emdiffuse.models.sampler_names import SAMPLER_NAMES, STOCHASTIC
from emdiffuse.models.variants import DEFAULT_RESIDUAL_SCALE, ModelConfig
from emdiffuse.training import trainer


def _perturbed(config: ModelConfig, seed: int = 0) -> Enhancer:
    """An Enhancer whose zero-initialised last layers are perturbed, so it computes
    something other than its input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(config)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith(("out.2.weight", "out.weight")):
                    p.add_(0.05 * torch.randn_like(p))
    return Enhancer(config, net)


def _batch(enhancer: Enhancer, b=2, side=16, seed=0):
    rng = np.random.default_rng(seed)
    cond = rng.uniform(-1, 1, (b, enhancer.in_slices, side, side)).astype(np.float32)
    noise = rng.standard_normal((b, enhancer.out_slices, side, side)).astype(np.float32)
    return cond, noise


def _step_noise(shape, seed=5):
    return lambda i: np.random.default_rng([seed, i]).standard_normal(shape).astype(np.float32)


# ---- config --------------------------------------------------------------------------------
def test_residual_config_round_trip_and_checks():
    config = make_config("vemdiffuse-i", "tiny", scale_factor=4, kind="residual")
    assert config.residual and config.residual_scale == DEFAULT_RESIDUAL_SCALE
    # the diffusion UNet sees [2 bounding slices, 3 mean slices, 3 noisy residual slices]
    assert config.unet.in_channels == 2 + 3 + 3 and config.unet.out_channels == 3
    assert (config.mean_net.in_channels, config.mean_net.out_channels) == (2, 3)
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(InputError, match="index embedding"):
        make_config("vemdiffuse-i", "tiny", kind="residual", use_index_embedding=True)
    with pytest.raises(InputError, match="index embedding"):
        config.replace(use_index_embedding=True)
    with pytest.raises(InputError, match="residual_scale"):
        config.replace(residual_scale=0.0)
    with pytest.raises(InputError, match="mean_net"):
        config.replace(mean_net=None)
    with pytest.raises(InputError, match="belong to kind 'residual'"):
        make_config("emdiffuse-n", "tiny").replace(residual_scale=0.2)
    with pytest.raises(InputError, match="unknown kind"):
        config.replace(kind="bridge")
    with pytest.raises(InputError, match="mean_net maps"):
        config.replace(mean_net=make_config("emdiffuse-n", "tiny", kind="residual").mean_net)
    # the SR3 kind is unchanged: no new fields set, same UNet as before
    sr3 = make_config("emdiffuse-n", "tiny")
    assert sr3.kind == "sr3" and sr3.mean_net is None and sr3.unet.in_channels == 2


def test_one_checkpoint_holds_both_networks(tmp_path):
    config = make_config("emdiffuse-r", "tiny", scale_factor=2, kind="residual", prediction="v")
    net = build_network(config)
    assert isinstance(net, MeanResidualNet)
    state = net.state_dict()
    assert {k.split(".")[0] for k in state} == {"mean", "residual", "error"}
    path = save_checkpoint(tmp_path / "m.safetensors", state, config)
    loaded, weights = load_checkpoint(path)
    assert loaded == config and set(weights) == set(state)
    with pytest.raises(InputError, match="missing key"):
        check_state_dict(config, {k: v for k, v in state.items() if k.startswith("residual.")})
    sr3 = make_config("emdiffuse-r", "tiny", scale_factor=2)
    with pytest.raises(InputError, match="unexpected key"):
        check_state_dict(sr3, state)
    # the mean network starts at the baseline: the upsampled (here: given) input
    enhancer = Enhancer.load(path, precision="fp32")  # the exact start, not bf16 rounding
    cond = np.random.default_rng(0).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32)
    up = enhancer._upsample(torch.from_numpy(cond)).numpy()
    np.testing.assert_allclose(enhancer.posterior_mean(cond), up, atol=1e-6)
    assert baseline_weights(make_config("vemdiffuse-i", "tiny", scale_factor=4)) == [
        [0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]  # fmt: skip


def test_least_squares_skip_recovers_an_affine_map_and_shrinks_noise():
    rng = np.random.default_rng(0)
    cond = torch.from_numpy(rng.uniform(-1, 1, (6, 2, 12, 12)))
    weights = np.array([[0.75, 0.25], [0.5, 0.5], [-0.2, 1.1]])
    bias = np.array([0.1, -0.3, 0.0])
    target = torch.from_numpy(np.einsum("oi,bi...->bo...", weights, cond.numpy())
                              + bias[None, :, None, None])  # fmt: skip
    w, b = least_squares_skip(cond.float(), target.float())
    np.testing.assert_allclose(w, weights, atol=1e-5)
    np.testing.assert_allclose(b, bias, atol=1e-5)
    # a noisy copy of a signal: the weight is var(signal) / (var(signal) + var(noise))
    signal = torch.from_numpy(rng.normal(0.2, 0.5, (64, 1, 32, 32)))
    noisy = signal + torch.from_numpy(rng.normal(0, 1.0, signal.shape))
    w, b = least_squares_skip(noisy, signal)
    assert abs(w[0][0] - 0.25 / 1.25) < 0.01 and abs(b[0] - 0.2 * (1 - w[0][0])) < 0.01
    # the network takes the fit as its skip; a constant channel gets weight 0
    config = make_config("vemdiffuse-i", "tiny", scale_factor=4, kind="residual")
    net = build_network(config)
    flat = torch.cat([cond[:, :1], torch.zeros_like(cond[:, :1])], dim=1).float()
    w, b = least_squares_skip(flat, target.float())
    assert all(row[1] == 0.0 for row in w)
    net.mean.init_skip(w, b)
    torch.testing.assert_close(net.mean.skip.bias, torch.tensor(b, dtype=torch.float32))
    with pytest.raises(InputError, match="same grid"):
        least_squares_skip(cond[:, :, :8], target)



@pytest.mark.parametrize("dims", [2, 3])
def test_a_wide_least_squares_skip_recovers_a_linear_filter(dims):
    """``least_squares_skip(..., size)`` recovers a known linear filter (taps and offset)
    from the voxels whose whole window lies inside the patch; the network's mirrored skip then
    reproduces the target there, and per-voxel weights land on the kernel's centre tap."""
    conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
    rng = np.random.default_rng(dims)
    side = 12 if dims == 2 else 8
    cond = torch.from_numpy(rng.uniform(-1, 1, (3, 2) + (side,) * dims))
    kernel = torch.from_numpy(rng.normal(size=(2, 2) + (3,) * dims))
    target = torch.nn.functional.pad(conv(cond, kernel) + 0.25, (1,) * 2 * dims)  # border unfitted
    w, b = least_squares_skip(cond, target, 3)
    np.testing.assert_allclose(w, kernel.numpy(), atol=1e-9)
    np.testing.assert_allclose(b, [0.25, 0.25], atol=1e-9)
    net = MeanUNet(MeanNetConfig(dims=dims, in_channels=2, out_channels=2, skip_size=3))
    net.init_skip(w, b)
    inner = (slice(None), slice(None)) + (slice(1, -1),) * dims
    with torch.no_grad():
        torch.testing.assert_close(net(cond.float())[inner], target.float()[inner], atol=1e-5, rtol=0)
        net.init_skip([[1.0, 0.0], [0.5, 0.5]], 0.0)  # per voxel: the centre tap, mirrored edges
        out = net(cond.float())
    torch.testing.assert_close(out[:, 0], cond[:, 0].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1], cond.float().mean(1), atol=1e-6, rtol=0)
    assert skip_gains(net.skip.weight) == [[1.0, 0.0], [0.5, 0.5]]
    with pytest.raises(InputError, match="size must be odd"):
        least_squares_skip(cond, target, 4)
    with pytest.raises(InputError, match="smaller than the patch"):
        least_squares_skip(cond, target, 13)


@pytest.mark.parametrize("size", [0, 2, 17, True, 3.0])
def test_skip_size_must_be_a_small_odd_integer(size):
    with pytest.raises(InputError, match="skip_size must be an odd integer in 1..15"):
        MeanNetConfig(skip_size=size)

@pytest.mark.parametrize("value", [1, "yes", None])
def test_channel_norm_must_be_a_boolean(value):
    with pytest.raises(InputError, match="channel_norm must be true or false"):
        MeanNetConfig(channel_norm=value)


def test_new_mean_networks_have_batch_norm_and_older_configs_load_their_own_norm():
    """Presets give new mean networks batch norm. A config written before it (no
    ``batch_norm`` field, the channel norm on) builds the channel-norm network it was; one
    written before either norm builds a network without norm layers and with fewer weights."""
    config = make_config("emdiffuse-r", "tiny", scale_factor=4, kind="residual")
    assert config.mean_net.batch_norm is True and config.mean_net.channel_norm is False
    assert any(isinstance(m, nn.BatchNorm2d) for m in MeanUNet(config.mean_net).modules())
    saved = config.mean_net.to_dict()
    channel = {**{k: v for k, v in saved.items() if k != "batch_norm"}, "channel_norm": True}
    before = MeanNetConfig.from_dict(channel)
    assert before.channel_norm is True and before.batch_norm is False
    assert any(isinstance(m, ChannelNorm) for m in MeanUNet(before).modules())
    bare = MeanNetConfig.from_dict({k: v for k, v in channel.items() if k != "channel_norm"})
    net = MeanUNet(bare)
    assert not any(isinstance(m, (ChannelNorm, nn.BatchNorm2d)) for m in net.modules())
    assert len(net.state_dict()) < len(MeanUNet(before).state_dict())
    for old in (before, bare):
        restored = ModelConfig.from_json(config.replace(mean_net=old).to_json())
        assert restored.mean_net == old


@pytest.mark.parametrize("norm", ["channel_norm", "batch_norm"])
def test_an_override_naming_a_norm_replaces_the_presets(norm):
    """``mean_net={"channel_norm": True}`` asks for the channel norm instead of the presets'
    batch norm (not for both, which is refused); naming a norm false leaves none."""
    chosen = make_config("emdiffuse-n", "tiny", kind="residual", mean_net={norm: True})
    assert (chosen.mean_net.channel_norm, chosen.mean_net.batch_norm) == (
        norm == "channel_norm", norm == "batch_norm")  # fmt: skip
    off = make_config("emdiffuse-n", "tiny", kind="residual", mean_net={norm: False})
    assert not off.mean_net.channel_norm and not off.mean_net.batch_norm


@pytest.mark.parametrize("norm", ["channel_norm", "batch_norm"])
def test_the_mean_networks_norm_keeps_a_voxels_output_local(norm):
    """At inference neither norm mixes voxels: changing the input far outside a voxel's
    receptive field leaves its output bit-identical (a spatial norm would not). Batch norm is
    then a fixed affine map from its running statistics, which a few training-mode passes
    have moved away from their start here."""
    torch.manual_seed(0)
    base = make_config("emdiffuse-n", "tiny", kind="residual").mean_net
    config = dataclasses.replace(base, channel_norm=norm == "channel_norm",
                                 batch_norm=norm == "batch_norm")  # fmt: skip
    net = MeanUNet(config)
    with torch.no_grad():
        net.out.weight.normal_()  # a body that computes something
        for _ in range(3):  # training mode: batch statistics, running averages updated
            net(2.0 * torch.randn(4, 1, 64, 64) + 1.0)
        net.eval()
        x = torch.randn(1, 1, 128, 128)
        far = x.clone()
        far[..., 96:, 96:] = 5.0 * torch.randn(1, 1, 32, 32)
        a, b = net(x), net(far)
    torch.testing.assert_close(a[..., :32, :32], b[..., :32, :32], rtol=0, atol=0)
    assert (a[..., 96:, 96:] - b[..., 96:, 96:]).abs().max() > 0.1
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == (10 if norm == "batch_norm" else 0)  # 2 per block, 5 blocks
    if norms:
        assert float(norms[0].running_mean.abs().max()) > 0.01


@pytest.mark.parametrize("value", [1, "yes", None])
def test_batch_norm_must_be_a_boolean(value):
    with pytest.raises(InputError, match="batch_norm must be true or false"):
        MeanNetConfig(batch_norm=value)


def test_the_mean_network_has_one_norm_at_most():
    with pytest.raises(InputError, match="channel_norm and batch_norm exclude each other"):
        MeanNetConfig(channel_norm=True, batch_norm=True)
    assert MeanNetConfig.from_dict({"batch_norm": True}).batch_norm is True


def _train_mean_body(config: MeanNetConfig, seed: int, steps: int = 60) -> tuple[float, float]:
    """Std of the bottom features and of the last block after ``steps`` Adam steps at a
    high learning rate on a ×4 super-resolution of random edges (32² patches)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MeanUNet(config)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    feats: dict[str, torch.Tensor] = {}
    net.bottom.register_forward_hook(lambda m, i, o: feats.__setitem__("bottom", o))
    net.up[-1].register_forward_hook(lambda m, i, o: feats.__setitem__("last", o))
    for _ in range(steps):
        field = torch.randn(8, 1, 36, 36, generator=gen)
        target = torch.tanh(3 * nn.functional.avg_pool2d(field, 5, 1))  # edges, 32²
        cond = nn.functional.interpolate(nn.functional.avg_pool2d(target, 4), scale_factor=4)
        loss = nn.functional.mse_loss(net(cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(feats["bottom"].detach().std()), float(feats["last"].detach().std())


@pytest.mark.parametrize("norm", ["batch_norm", "channel_norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_body_survives_a_high_learning_rate(seed, norm):
    """The body's output layer starts at zero, so its first gradients are tiny and Adam
    turns them into full-size steps: without a norm the body's features blew up and its last
    block could end all-negative under SiLU — dead, the model its linear skip for good (the
    reference-size super-resolution model on FlyEM, 28.63 dB = its skip). With the batch
    norm of the presets (or the channel norm before it) the features stay bounded and the
    last block alive; without a norm every seed here died in these 60 steps: bottom std
    106–1866, last block std 0."""
    config = make_config("emdiffuse-r", "tiny", scale_factor=4, kind="residual",
                         mean_net={norm: True}).mean_net  # fmt: skip
    bottom, last = _train_mean_body(config, seed)
    assert bottom < 5.0 and last > 0.2, (bottom, last)


def test_residual_loss_trains_both_and_detaches_the_mean():
    config = make_config("emdiffuse-n", "tiny", kind="residual", prediction="v")
    torch.manual_seed(0)
    net = build_network(config)
    cond = torch.rand(2, 1, 16, 16) * 2 - 1
    x0 = (cond * 0.5).clamp(-1, 1)
    noise, levels = torch.randn_like(x0), torch.tensor([0.5, 0.1])
    mean, pred, r, _ = net(cond, x0, noise, levels)
    torch.testing.assert_close(r, (x0 - mean.detach()) / config.residual_scale)
    pred.sum().backward()  # the residual branch alone
    assert all(p.grad is None or not p.grad.any() for p in net.mean.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.residual.parameters())
    net.zero_grad()
    schedule = diffusion.Schedule()
    total, part_mean = diffusion.residual_loss(net, cond, x0, schedule, "v", "mse", "mse",
                                               noise=noise, u=torch.rand(2))  # fmt: skip
    torch.testing.assert_close(part_mean, torch.nn.functional.mse_loss(net(cond), x0))
    assert total > part_mean
    total.backward()
    assert any(p.grad is not None and p.grad.any() for p in net.mean.parameters())




def test_the_ssim_term_is_the_benchmarks_ssim_in_float32_on_every_slice():
    """``ssim_loss`` is 1 - :func:`emdiffuse.metrics.ssim` of the two on the [0, 1] scale,
    for 2-D batches and 3-D patches (slice by slice), in float32 under bf16 autocast too;
    ``residual_loss``'s mean part adds it with its weight; images under the window are
    refused."""
    from emdiffuse.metrics import ssim

    rng = np.random.default_rng(0)
    for shape in ((3, 1, 24, 24), (2, 1, 3, 16, 20)):
        truth = np.clip(rng.random(shape) * 2 - 1, -1, 1).astype(np.float32)
        estimate = (truth * 0.6 + rng.normal(0, 0.2, shape)).astype(np.float32)
        scored = ssim((estimate.reshape(-1, *shape[-2:]) + 1) / 2,
                      (truth.reshape(-1, *shape[-2:]) + 1) / 2)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            term = diffusion.ssim_loss(torch.from_numpy(estimate), torch.from_numpy(truth))
        assert term.dtype == torch.float32
        assert float(term) == pytest.approx(1 - scored, abs=1e-5)
    config = make_config("emdiffuse-n", "tiny", kind="residual", prediction="v")
    torch.manual_seed(0)
    net = build_network(config)
    cond = torch.rand(2, 1, 16, 16) * 2 - 1
    x0 = (cond * 0.5).clamp(-1, 1)
    args = (net, cond, x0, diffusion.Schedule(), "v", "mse", "mse")
    rest = dict(noise=torch.randn_like(x0), u=torch.rand(2))
    _, plain = diffusion.residual_loss(*args, **rest)
    _, weighted = diffusion.residual_loss(*args, mean_ssim=0.5, **rest)
    torch.testing.assert_close(weighted, plain + 0.5 * diffusion.ssim_loss(net(cond), x0))
    torch.testing.assert_close(
        diffusion.mean_loss_only(net, cond, x0, mean_ssim=0.5), weighted
    )
    with pytest.raises(InputError, match="at least 11 voxels a side"):
        diffusion.ssim_loss(torch.zeros(1, 1, 8, 32), torch.zeros(1, 1, 8, 32))


def test_the_ssim_term_asks_for_more_contrast_than_squared_error():
    """What ``mean_ssim`` is for: on a noisy observation y of a textured image x, the gain g
    minimising the squared error of g*y is the Wiener shrinkage; adding SSIM's term moves
    the best gain up (more local contrast), at a little squared error."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    x = gaussian_filter(rng.normal(0, 1, (4, 64, 64)), (0, 1.5, 1.5))
    x = torch.from_numpy(0.5 * x / x.std()).float()[:, None]
    y = x + 0.4 * torch.from_numpy(rng.normal(0, 1, x.shape)).float()
    gains = torch.linspace(0.2, 1.2, 101)
    mse = torch.stack([torch.mean((g * y - x) ** 2) for g in gains])
    term = torch.stack([diffusion.ssim_loss(g * y, x) for g in gains])
    best = {w: float(gains[torch.argmin(mse + w * term)]) for w in (0.0, 1.0, 10.0)}
    assert best[0.0] == pytest.approx(float((x * y).sum() / (y * y).sum()), abs=0.01)
    assert best[0.0] < best[1.0] < best[10.0]


def test_residual_rows_train_the_mean_on_all_samples_and_the_residual_on_the_first_k():
    """``residual_rows=k``: the mean term covers the whole batch, the diffusion term only the
    first k samples (the same numbers as a batch of those k alone), and samples past k give
    the residual network no gradient. (No error head: its term covers every sample,
    tests/models/test_error_head.py. The channel norm, not the presets' batch norm, whose
    training-mode statistics over the whole batch reach the first k samples' mean too.)"""
    config = make_config("emdiffuse-n", "tiny", kind="residual", prediction="v",
                         mean_net={"error_channels": 0, "channel_norm": True})  # fmt: skip
    torch.manual_seed(0)
    net = build_network(config)
    with torch.no_grad():  # zero-initialised output layers would hide the rows
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cond = torch.rand(4, 1, 16, 16) * 2 - 1
    x0 = (cond * 0.5).clamp(-1, 1)
    noise, u = torch.randn_like(x0), torch.rand(4)
    schedule = diffusion.Schedule()
    args = (schedule, "v", "mse", "mse")
    total, part_mean = diffusion.residual_loss(net, cond, x0, *args, noise=noise, u=u,
                                               residual_rows=2)  # fmt: skip
    sub_total, sub_mean = diffusion.residual_loss(net, cond[:2], x0[:2], *args,
                                                  noise=noise[:2], u=u[:2])  # fmt: skip
    torch.testing.assert_close(part_mean, torch.nn.functional.mse_loss(net(cond), x0))
    torch.testing.assert_close(total - part_mean, sub_total - sub_mean)
    full_total, _ = diffusion.residual_loss(net, cond, x0, *args, noise=noise, u=u)
    assert not torch.isclose(full_total, total)  # the rows past k counted before
    grads = []
    for k in (2, 2, 4):  # change a sample past k: the residual's gradient does not move
        net.zero_grad()
        c = cond.clone()
        if len(grads) == 1:
            c[3] = -c[3]
        diffusion.residual_loss(net, c, x0, *args, noise=noise, u=u, residual_rows=k)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.residual.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert not torch.allclose(grads[0], grads[2])
    for bad in (0, 5):
        with pytest.raises(InputError, match="residual_rows must be in 1..4"):
            diffusion.residual_loss(net, cond, x0, *args, noise=noise, u=u, residual_rows=bad)


# ---- the Enhancer interface ------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_residual_samples_are_zero_mean_around_the_mean_network(sampler):
    """The mean intensity is the mean network's alone: every sampler's residual has zero
    spatial mean per sample and channel (the residual's x0 estimate is centred at every
    step), even where the residual UNet has learned an offset of its own. Fails without
    centring: this perturbed network's residuals average about a tenth of their spread."""
    config = make_config("emdiffuse-n", "tiny", kind="residual", prediction="v")
    enhancer = _perturbed(config, seed=3)
    with torch.no_grad():  # an offset the residual UNet learned (the demo's: +2-3 % of range)
        enhancer.net.residual.out[-1].bias.add_(0.2)
    cond, noise = _batch(enhancer, side=32)
    cond = 0.3 * cond  # away from the [-1, 1] bounds the residual is clipped to
    step_noise = _step_noise(noise.shape) if sampler in STOCHASTIC else None
    _, r = enhancer.sample_parts(cond, noise, sampler=sampler, steps=4, step_noise=step_noise)
    per_tile = np.abs(r.mean(axis=(-2, -1)))
    assert r.std() > 1e-3
    assert per_tile.max() <= 1e-3 * max(r.std(), 1.0), (per_tile, r.std())


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_residual_kind_parts(sampler):
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", kind="residual", prediction="v"))
    cond, noise = _batch(enhancer)
    step_noise = _step_noise(noise.shape) if sampler in STOCHASTIC else None
    mean = enhancer.posterior_mean(cond)
    np.testing.assert_array_equal(mean, enhancer.posterior_mean(cond, noise))
    m, r = enhancer.sample_parts(cond, noise, sampler=sampler, steps=3, step_noise=step_noise)
    np.testing.assert_allclose(m, mean, atol=1e-6)
    assert np.abs(r).max() > 1e-3  # texture on top of the mean
    # mean + residual stays in [-1, 1] (the residual's x0 estimate is bounded around the mean)
    assert (m + r).min() >= -1 - 1e-5 and (m + r).max() <= 1 + 1e-5
    out = enhancer.enhance(cond, noise, sampler=sampler, steps=3, step_noise=step_noise)
    np.testing.assert_allclose(out, np.clip(m + r, -1, 1), atol=1e-6)
    # a mean passed in is used as it is (one evaluation for several samples)
    m2, r2 = enhancer.sample_parts(cond, noise, sampler=sampler, steps=3, step_noise=step_noise,
                                   mean=mean)  # fmt: skip
    np.testing.assert_array_equal(m2, mean)
    np.testing.assert_allclose(r2, r, atol=1e-6)
    shifted, _ = enhancer.sample_parts(cond, noise, sampler=sampler, steps=3,
                                       step_noise=step_noise, mean=mean + 0.1)  # fmt: skip
    np.testing.assert_allclose(shifted, mean + 0.1, atol=1e-6)


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("spacing", ["time", "logsnr", "karras"])
def test_sr3_mean_is_the_first_steps_estimate(prediction, spacing):
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", prediction=prediction))
    cond, noise = _batch(enhancer)
    mean = enhancer.posterior_mean(cond, noise)
    m, r = enhancer.sample_parts(cond, noise, sampler="ddim", steps=4, spacing=spacing)
    np.testing.assert_allclose(m, mean, atol=1e-5)
    out = enhancer.enhance(cond, noise, sampler="ddim", steps=4, spacing=spacing)
    np.testing.assert_allclose(np.clip(m + r, -1, 1), out, atol=1e-6)
    with pytest.raises(InputError, match="residual-kind"):
        enhancer.sample_parts(cond, noise, sampler="ddim", steps=2, mean=mean)


def test_sr3_eps_has_no_mean_path_and_callbacks_still_run():
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", prediction="eps"))
    cond, noise = _batch(enhancer)
    seen = []
    m, r = enhancer.sample_parts(cond, noise, sampler="dpmpp_2m", steps=3,
                                 callback=lambda info: seen.append(info["i"]))  # fmt: skip
    assert seen == [0, 1, 2]
    np.testing.assert_array_equal(r, np.zeros_like(r))
    np.testing.assert_allclose(np.clip(m, -1, 1), enhancer.enhance(cond, noise, steps=3), atol=1e-6)


def test_index_embedding_parts():
    config = make_config("vemdiffuse-i", "tiny", scale_factor=3, prediction="v",
                         use_index_embedding=True)  # fmt: skip
    enhancer = _perturbed(config)
    cond, noise = _batch(enhancer)
    mean = enhancer.posterior_mean(cond, noise)
    m, r = enhancer.sample_parts(cond, noise, sampler="ddim", steps=2)
    assert m.shape == r.shape == (2, 2, 16, 16)
    np.testing.assert_allclose(m, mean, atol=1e-5)
    out = enhancer.enhance(cond, noise, sampler="ddim", steps=2)
    np.testing.assert_allclose(np.clip(m + r, -1, 1), out, atol=1e-6)


def test_residual_callback_sees_model_space():
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", kind="residual", prediction="v"))
    cond, noise = _batch(enhancer)
    last = {}
    out = enhancer.enhance(cond, noise, sampler="ddim", steps=3,
                           callback=lambda info: last.update(info))  # fmt: skip
    np.testing.assert_allclose(last["denoised"].numpy(), out, atol=1e-5)


def test_inputs_are_checked():
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", kind="residual"))
    cond, noise = _batch(enhancer)
    with pytest.raises(InputError, match="noise has shape"):
        enhancer.posterior_mean(cond, noise[:, :, :8])
    with pytest.raises(InputError, match="mean has shape"):
        enhancer.sample_parts(cond, noise, sampler="ddim", steps=1, mean=noise[:1])
    with pytest.raises(InputError, match="needs noise"):
        _perturbed(make_config("emdiffuse-n", "tiny")).posterior_mean(cond)


# ---- training --------------------------------------------------------------------------------
def test_residual_objective_trains_one_checkpoint(tmp_path):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((4, 64, 64)), (0, 2, 2)).astype(np.float32)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    fast = dict(size="tiny", batch_size=2, patch=16, lr=1e-3, warmup=2, val_every=2,
                val_batch=2, val_steps=2, progress=False, region=32, val_fraction=0.25,
                device="cpu", calibration_patches=4, fit_steps=2)  # fmt: skip
    path = trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=4, ckpt_every=2,
                         objective="residual", residual_scale=0.3,
                         mean_net={"base_channels": 8, "depth": 1}, **fast)  # fmt: skip
    config, state = load_checkpoint(path)
    assert config.kind == "residual" and config.residual_scale == 0.3
    assert (config.mean_net.base_channels, config.mean_net.depth) == (8, 1)
    assert any(k.startswith("mean.") for k in state) and any(k.startswith("residual.") for k in state)
    assert config.calibration is not None and config.calibration["samples"] == 4
    assert 0.0 <= config.calibration["residual_correlation"] <= 1.0
    # the few-step schedule fitted on the held-out patches (models/step_fit.py)
    fitted = config.step_schedules
    assert fitted["sampler"] == "dpmpp_2m" and list(fitted["schedules"]) == ["2"]
    assert fitted["patches"] == 4 and len(fitted["schedules"]["2"]["sigmas"]) == 2
    assert fitted["schedules"]["2"]["rms"] <= fitted["schedules"]["2"]["rms_logsnr"]
    # ... which is the run default, so the intervals are calibrated on it
    calibrated = tuple(config.calibration[k] for k in ("sampler", "steps", "spacing"))
    assert calibrated == ("dpmpp_2m", 2, "fitted")
    rows = (tmp_path / "r" / "scalars.csv").read_text().splitlines()
    assert "val_psnr_mean" in rows[0]
    # resuming keeps the kind; a diffusion (SR3) run may not continue it
    trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=6, ckpt_every=2,
                  objective="residual", residual_scale=0.3, resume=True,
                  mean_net={"base_channels": 8, "depth": 1}, **fast)  # fmt: skip
    with pytest.raises(InputError, match="objective"):
        trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=8, resume=True,
                      objective="diffusion", **fast)  # fmt: skip
    # the default objective resumes as residual; another mean network is refused up front
    with pytest.raises(InputError, match="mean_net was"):
        trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=8, resume=True, **fast)
    with pytest.raises(InputError, match="kind 'residual'"):
        trainer.train("denoise", [noisy, clean], tmp_path / "ft", steps=1, init=str(path),
                      objective="diffusion", **fast)  # fmt: skip
    with pytest.raises(InputError, match="index-embedding|index embedding"):
        make_config("vemdiffuse-a", "tiny", kind="residual", use_index_embedding=True)


def _batch_norm_run(tmp_path):
    """A tiny batch-norm denoising run: ``(config, eval-mode net, its dataset)``; the
    dataset rebuilt from the run's settings yields the run's training batches."""
    from scipy.ndimage import gaussian_filter

    from emdiffuse.training import build
    from emdiffuse.training.settings import TrainSettings

    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((4, 64, 64)), (0, 2, 2)).astype(np.float32)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    opts = dict(size="tiny", batch_size=2, patch=16, lr=1e-2, warmup=1, val_every=100,
                progress=False, region=32, val_fraction=0.25, device="cpu",
                calibration_samples=0, fit_steps=0, objective="residual", precision="fp32",
                mean_net={"base_channels": 8, "depth": 1, "channel_norm": False,
                          "batch_norm": True})  # fmt: skip
    path = trainer.train("denoise", [noisy, clean], tmp_path / "r", steps=6, **opts)
    config, state = load_checkpoint(path)
    net = build_network(config)
    net.load_state_dict(state)
    s = TrainSettings(task="denoise", data=["noisy", "clean"], steps=6,
                      **{k: v for k, v in opts.items() if k not in ("progress", "device")})
    return config, net.eval(), build.build_dataset(s, [noisy, clean])


def test_a_batch_norm_mean_network_is_saved_with_its_own_statistics(tmp_path):
    """With ``batch_norm`` the saved (averaged) mean network carries batch-norm statistics
    estimated on its own activations over training batches at the end of the run
    (:mod:`emdiffuse.training.norm_stats`), not the live network's of the last steps: the
    first layer's running mean is the average of the averaged network's first convolution
    over those batches, and the checkpoint enhances as an eval-mode network."""
    from emdiffuse.models.conditioning import upsample_xy
    from emdiffuse.training.norm_stats import NORM_BATCHES, training_batches

    config, net, dataset = _batch_norm_run(tmp_path)
    assert config.mean_net.batch_norm and not config.mean_net.channel_norm
    assert config.step_schedules is None  # fit_steps 0: none fitted
    first = net.mean.down[0]  # conv, batch norm, SiLU, conv, ...
    # the statistic recomputed: the training batches the run used, through the saved weights
    sums = []
    with torch.no_grad():
        for batch in training_batches(dataset, 2):
            cond = upsample_xy(batch["cond"], config.xy_scale, config.cond_upsample)
            sums.append(first[0](cond.float()).mean(dim=(0, 2, 3)))
    expected = torch.stack(sums).mean(0)
    assert len(sums) == NORM_BATCHES
    torch.testing.assert_close(first[1].running_mean, expected, rtol=1e-4, atol=1e-5)
    enhancer = Enhancer(config, net)
    assert not enhancer.net.training


def test_a_batch_norm_mean_network_is_unbiased_at_inference_on_its_training_batches(tmp_path):
    """Training fits the output to batch statistics, inference uses the population's: the
    saved mean network's output offset is re-fitted in eval mode after its statistics, so
    that its mean error over the training batches is zero (before, a 6-step run was off by
    several per cent of the model range, as FlyEM models were by ±0.4–0.8 %)."""
    from emdiffuse.models.conditioning import upsample_xy
    from emdiffuse.training.norm_stats import training_batches

    config, net, dataset = _batch_norm_run(tmp_path)
    errors, spreads = [], []
    with torch.no_grad():
        for batch in training_batches(dataset, 2):
            cond = upsample_xy(batch["cond"], config.xy_scale, config.cond_upsample)
            error = batch["target"] - net.mean(cond.float())
            errors.append(error.mean())
            spreads.append(error.abs().mean())
    mean_error, typical = torch.stack(errors).mean().item(), torch.stack(spreads).mean().item()
    assert typical > 1e-3  # a real error to average, not a constant output
    assert abs(mean_error) < 1e-4 * max(1.0, typical), (mean_error, typical)


@pytest.mark.parametrize("variant, k", [("emdiffuse-n", None), ("vemdiffuse-i", 4)])
def test_untrained_mean_is_the_input_in_raw_units_whatever_the_ranges(variant, k):
    """The mean network starts at "output = input" in RAW units: with a condition range
    unlike the target's (a noisy input spans far more), an identity in model space would
    start the mean — and the posterior mean of a briefly trained model — biased."""
    condition, target = {"low": -0.05, "high": 2.5}, {"low": 0.12, "high": 0.77}
    config = make_config(variant, scale_factor=k, kind="residual", normalization=target,
                         condition_normalization=condition)  # fmt: skip
    net = build_network(config).eval()
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.1, 0.8, size=(1, config.in_slices, 16, 16))
    cond = (raw - condition["low"]) / ((condition["high"] - condition["low"]) / 2) - 1
    with torch.no_grad():
        mean = net(torch.as_tensor(cond, dtype=torch.float32)).numpy().astype(np.float64)
    back = (mean + 1) * (target["high"] - target["low"]) / 2 + target["low"]
    expected = np.einsum("oi,bihw->bohw", np.asarray(baseline_weights(config)), raw)
    np.testing.assert_allclose(back, expected, atol=1e-5)


# ---- a truncated start (start_noise) -----------------------------------------------------------
def test_start_noise_starts_the_residual_sample_at_that_noise_level():
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", kind="residual", prediction="v"))
    cond, noise = _batch(enhancer)
    kw = dict(sampler="dpmpp_2m", steps=4, spacing="karras")
    levels: list[float] = []
    truncated = enhancer.enhance(cond, noise, start_noise=2.0,
                                 callback=lambda info: levels.append(info["alpha_bar"]), **kw)  # fmt: skip
    assert levels[0] == pytest.approx(1 / (1 + 2.0**2))  # sigma 2: alpha-bar 0.2
    assert len(levels) == 4 and all(b > a for a, b in zip(levels, levels[1:], strict=False))
    full = enhancer.enhance(cond, noise, **kw)
    assert np.abs(truncated - full).max() > 1e-3  # another sample: it starts elsewhere
    # a start noisier than the schedule's noisiest level is the full sample, exactly
    np.testing.assert_array_equal(enhancer.enhance(cond, noise, start_noise=1e6, **kw), full)
    m, r = enhancer.sample_parts(cond, noise, start_noise=2.0, **kw)
    np.testing.assert_allclose(np.clip(m + r, -1, 1), truncated, atol=1e-6)


@pytest.mark.parametrize(
    "bad, words",
    [({"start_noise": -1.0}, "positive number"), ({"start_noise": float("nan")}, "positive"),
     ({"start_noise": True}, "positive"), ({"start_noise": 2.0, "spacing": "time"}, "karras")],
)  # fmt: skip
def test_start_noise_is_checked(bad, words):
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", kind="residual"))
    cond, noise = _batch(enhancer)
    with pytest.raises(InputError, match=words):
        enhancer.enhance(cond, noise, **{"sampler": "dpmpp_2m", "steps": 2, **bad})


def test_start_noise_is_refused_for_the_sr3_kind():
    enhancer = _perturbed(make_config("emdiffuse-n", "tiny", prediction="v"))
    cond, noise = _batch(enhancer)
    with pytest.raises(InputError, match="mean-plus-residual"):
        enhancer.enhance(cond, noise, sampler="dpmpp_2m", steps=2, start_noise=2.0)
