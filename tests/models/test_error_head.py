"""The error head of the mean-plus-residual model (issue 14, part 4): ``log σ²`` of the
posterior mean's error, learned by the Gaussian negative log-likelihood with the mean
detached, so that the mean alone comes with calibrated intervals."""

from __future__ import annotations

import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.models import diffusion
from emdiffuse.models.checkpoints import load_checkpoint, save_checkpoint
from emdiffuse.models.mean_net import ERROR_DILATIONS, ErrorNet, MeanNetConfig
from emdiffuse.models.networks import build_network
from emdiffuse.models.presets import DEFAULT_ERROR_CHANNELS, make_config


def test_the_head_learns_where_the_error_is_large():
    """Errors drawn with σ 0.05 in the left half and 0.5 in the right: the head, given an
    input that shows which half is which, learns both scales."""
    torch.manual_seed(0)
    head = ErrorNet(2, 2, 1, 16)
    side = torch.where(torch.arange(32) < 16, 0.05, 0.5).expand(1, 1, 32, 32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        cond = side * torch.randn(8, 1, 32, 32)  # the noise is visible in the input
        error = side * torch.randn(8, 1, 32, 32)
        loss = diffusion.error_nll(head(cond, torch.zeros_like(cond)), error)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        cond = side * torch.randn(8, 1, 32, 32)
        sigma = torch.exp(0.5 * head(cond, torch.zeros_like(cond)))
    quiet, loud = sigma[..., 2:14].mean().item(), sigma[..., 18:30].mean().item()
    assert 0.035 < quiet < 0.07 and 0.35 < loud < 0.7


def test_the_head_never_moves_the_mean_or_the_residual_network():
    config = make_config("emdiffuse-n", "tiny", kind="residual", prediction="v")
    assert config.mean_net.error_channels == DEFAULT_ERROR_CHANNELS > 0
    torch.manual_seed(0)
    net = build_network(config)
    with torch.no_grad():  # zero-initialised output layers would hide the gradients
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cond = torch.rand(2, 1, 16, 16) * 2 - 1
    x0 = (cond * 0.5).clamp(-1, 1)
    noise, u = torch.randn_like(x0), torch.rand(2)

    def grads(model) -> dict[str, torch.Tensor]:
        model.zero_grad()
        diffusion.residual_loss(model, cond, x0, diffusion.Schedule(), noise=noise, u=u)[0].backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    with_head = grads(net)
    assert any(k.startswith("error.") and g.abs().sum() > 0 for k, g in with_head.items())
    head, net.error = net.error, None
    without = grads(net)
    net.error = head
    for name, grad in without.items():
        torch.testing.assert_close(with_head[name], grad, rtol=0, atol=0)


def test_models_made_before_the_head_load_without_one():
    old = {"dims": 2, "in_channels": 1, "out_channels": 1, "base_channels": 8, "depth": 1,
           "convs": 1, "skip_size": 1, "channel_norm": True}  # fmt: skip
    assert MeanNetConfig.from_dict(old).error_channels == 0
    config = make_config("emdiffuse-n", "tiny", kind="residual", mean_net={"error_channels": 0})
    net = build_network(config)
    assert net.error is None and not any(k.startswith("error.") for k in net.state_dict())
    mean, pred, r, log_variance = net(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16),
                                      torch.zeros(1, 1, 16, 16), torch.full((1,), 0.5))  # fmt: skip
    assert log_variance is None


def test_clipping_bounds_the_head_as_well_as_the_mean_and_residual_networks():
    """Each part of a mean-plus-residual model is clipped to the norm on its own, the error
    head included (its likelihood's gradients are not bounded by the other two)."""
    from emdiffuse.training.step import clip_gradients

    net = build_network(make_config("emdiffuse-n", "tiny", kind="residual", prediction="v"))
    for p in net.parameters():
        p.grad = torch.full_like(p, 10.0)
    total = clip_gradients(net, 1.0)
    parts = {"mean": net.mean, "residual": net.residual, "error": net.error}
    owned = [id(p) for part in net.parts() for p in part.parameters()]
    assert sorted(owned) == sorted(id(p) for p in net.parameters())  # every parameter, once
    for name, part in parts.items():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part.parameters()]))
        assert norm <= 1.0 + 1e-4, f"{name} not clipped: {norm:.3f}"
    before = 10.0 * sum(p.numel() for p in net.parameters()) ** 0.5
    assert abs(total - before) <= 1e-3 * before  # the norm over every parameter, before


def test_the_head_takes_its_dilations():
    """``dilations`` sets the body's 3×3 convolutions (the default keeps the shipped
    design); every design keeps the output on the input grid."""
    default = ErrorNet(2, 2, 1, 8)
    wider = ErrorNet(2, 2, 1, 8, (1, 2, 4, 8, 16))

    def dilations(head):
        return [m.dilation[0] for m in head.body if isinstance(m, torch.nn.Conv2d)]

    assert dilations(default) == [1, 1, 2, 4]
    assert dilations(wider) == [1, 2, 4, 8, 16]
    x = torch.randn(2, 1, 40, 40)
    assert wider(x, x).shape == default(x, x).shape == (2, 1, 40, 40)


def test_the_heads_dilations_are_part_of_the_model_config(tmp_path):
    """``mean_net.error_dilations`` builds the head, is saved with the checkpoint and loads
    back; a checkpoint written before the field loads with the shipped design; a bad value
    is refused in one line."""
    config = make_config("emdiffuse-n", "tiny", kind="residual",
                         mean_net={"error_dilations": [1, 2, 4, 8, 16]})  # fmt: skip
    net = build_network(config)
    body = [m.dilation[0] for m in net.error.body if isinstance(m, torch.nn.Conv2d)]
    assert body == [1, 2, 4, 8, 16]
    path = save_checkpoint(tmp_path / "wide.safetensors", net.state_dict(), config)
    loaded, state = load_checkpoint(path)
    assert loaded.mean_net.error_dilations == (1, 2, 4, 8, 16)
    build_network(loaded).load_state_dict(state)  # the same shapes
    old = {k: v for k, v in config.mean_net.to_dict().items() if k != "error_dilations"}
    assert MeanNetConfig.from_dict(old).error_dilations == ERROR_DILATIONS
    for bad in ([], [0, 1], [1.5], [1] * 9, "1,2"):
        with pytest.raises(InputError, match="error_dilations must be a list"):
            MeanNetConfig(error_dilations=bad)
