"""UNet shape contracts (2D, 3D, every variant and scale factor), attention, heads, index
embedding, and the input checks. Tiny networks: the whole file runs in seconds on a CPU."""

from __future__ import annotations

import math

import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.layers import AttentionBlock
from emdiffuse.models.presets import make_config
from emdiffuse.models.unet import UNet, UNetConfig

TINY = {"base_channels": 16, "channel_mults": (1, 2, 2), "num_res_blocks": 1,
        "num_head_channels": 16, "dropout": 0.0}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomized(net: UNet, seed: int = 0) -> UNet:
    """Every parameter drawn at random: a fresh UNet outputs zeros (its last conv is zeroed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            for name, parameter in module.named_parameters(recurse=False):
                noise = torch.randn(parameter.shape, generator=generator)
                if isinstance(module, torch.nn.GroupNorm) and name == "weight":
                    parameter.copy_(1 + 0.1 * noise)
                elif parameter.ndim > 1:
                    parameter.copy_(noise / math.sqrt(parameter[0].numel()))
                else:
                    parameter.copy_(0.1 * noise)
    return net.eval()


def _net(seed: int = 0, **kwargs) -> UNet:
    return _randomized(UNet(UNetConfig(**{**TINY, **kwargs})), seed)


def _run(net: UNet, x: torch.Tensor, level=0.5, index=None) -> torch.Tensor:
    with torch.no_grad():
        return net(x, torch.full((x.shape[0],), float(level)), index)


# --------------------------------------------------------------------------------------
# contracts of every variant
# --------------------------------------------------------------------------------------
CASES = [
    # variant, scale factor, index embedding, dims
    ("emdiffuse-n", 1, False, 2),
    ("emdiffuse-n", 1, False, 3),
    ("emdiffuse-r", 2, False, 2),
    ("emdiffuse-r", 4, False, 2),
    ("emdiffuse-r", 2, False, 3),
    ("emdiffuse-r", 4, False, 3),
    *[("vemdiffuse-i", k, False, 2) for k in range(4, 11)],
    *[("vemdiffuse-a", k, True, 2) for k in range(4, 11)],
    ("vemdiffuse-i", 6, True, 2),
    ("vemdiffuse-a", 6, False, 2),
]


@pytest.mark.parametrize("variant,k,index_mode,dims", CASES)
def test_variant_contract(variant, k, index_mode, dims):
    config = make_config(variant, "tiny", scale_factor=k, use_index_embedding=index_mode, dims=dims)
    u = config.unet
    isotropic = variant.startswith("vem")
    out_channels = 1 if (index_mode or not isotropic) else k - 1
    in_channels = (2 if isotropic else 1) + out_channels
    assert (u.dims, u.in_channels, u.out_channels) == (dims, in_channels, out_channels)
    assert u.use_index_embedding == index_mode
    assert u.num_indices == (k - 1 if index_mode else 0)
    net = _randomized(UNet(u))
    assert net.multiple == 4
    # the network runs on the output grid: super-resolution conditions on the upsampled input
    side = 4 * (k if variant == "emdiffuse-r" else 2)
    spatial = (4, side, 8) if dims == 3 else (side, 8)
    batch = 3
    x = torch.randn(batch, in_channels, *spatial)
    index = torch.arange(batch) % (k - 1) if index_mode else None
    y = _run(net, x, index=index)
    assert y.shape == (batch, out_channels, *spatial)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert y.abs().max() > 0
    if index_mode:
        _run(net, x, index=torch.full((batch,), k - 2))  # the last in-between slice
        with pytest.raises(InputError, match=rf"indices 0\.\.{k - 2}"):
            _run(net, x, index=torch.full((batch,), k - 1))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mults,sizes", [
    ((1, 2, 2), [(4, 4), (8, 20), (28, 12)]),
    ((1, 1, 2, 2), [(8, 8), (16, 24)]),
])  # fmt: skip
def test_any_multiple_works(dims, mults, sizes):
    net = _net(dims=dims, channel_mults=mults)
    multiple = 2 ** (len(mults) - 1)
    assert net.multiple == multiple
    for size in sizes:
        spatial = (multiple, *size) if dims == 3 else size
        assert all(s % multiple == 0 for s in spatial)
        y = _run(net, torch.randn(1, 2, *spatial))
        assert y.shape == (1, 1, *spatial)


@pytest.mark.parametrize("dims,spatial", [(2, (10, 12)), (2, (12, 6)), (3, (4, 8, 6)), (3, (2, 8, 8))])
def test_non_multiple_refused(dims, spatial):
    net = _net(dims=dims)
    with pytest.raises(InputError, match=r"not a multiple of 4 .*pad or crop"):
        _run(net, torch.randn(1, 2, *spatial))


def test_wrong_channels_or_axes_refused():
    net = _net()
    with pytest.raises(InputError, match=r"expects input \(B, 2, \.\.\., \.\.\.\)"):
        _run(net, torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="2 spatial axes"):
        _run(net, torch.randn(1, 2, 4, 8, 8))
    with pytest.raises(InputError, match="3 spatial axes"):
        _run(_net(dims=3), torch.randn(1, 2, 8, 8))


def test_noise_level_broadcast_and_batch_mismatch():
    net = _net()
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        scalar = net(x, torch.tensor(0.3))
        per_sample = net(x, torch.full((3,), 0.3))
        torch.testing.assert_close(scalar, per_sample)
        with pytest.raises(InputError, match="noise_level has 2 values for a batch of 3"):
            net(x, torch.tensor([0.3, 0.4]))


def test_outputs_depend_on_every_input_and_not_on_the_batch():
    net = _net(use_index_embedding=True, in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    index = torch.tensor([0, 1])
    base = _run(net, x, 0.5, index)
    torch.testing.assert_close(_run(net, x, 0.5, index), base)  # eval: dropout off, deterministic
    assert not torch.allclose(_run(net, x, 0.9, index), base, atol=1e-4)  # noise level
    assert not torch.allclose(_run(net, x, 0.5, index.flip(0)), base, atol=1e-4)  # index
    changed = x.clone()
    changed[:, 0] += 0.5
    assert not torch.allclose(_run(net, changed, 0.5, index), base, atol=1e-4)  # conditioning
    # each sample on its own gives the same result as in the batch (no cross-sample statistics)
    one = _run(net, x[1:], 0.5, index[1:])
    torch.testing.assert_close(one, base[1:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# attention and heads
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("resolutions", [(), (1,), (2,), (4,), (1, 4)])
def test_attention_at_chosen_resolutions(dims, resolutions):
    net = _net(dims=dims, attention_resolutions=resolutions, num_head_channels=8)
    tokens: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, inputs, out, name=name: tokens.__setitem__(name, inputs[0][0, 0].numel())
        )
        for name, module in net.named_modules()
        if isinstance(module, AttentionBlock)
    ]
    spatial = (8, 16, 16) if dims == 3 else (16, 16)
    _run(net, torch.randn(1, 2, *spatial))
    for hook in hooks:
        hook.remove()
    full = math.prod(spatial)
    expected = {"middle_block.1": full // 4**dims}  # after two downsamplings
    rb = TINY["num_res_blocks"]
    for level, factor in enumerate((1, 2, 4)):
        if factor in resolutions:
            # encoder: the stem, then per level rb blocks and (not last) a downsampling block
            for i in range(rb):
                expected[f"input_blocks.{1 + level * (rb + 1) + i}.1"] = full // factor**dims
            # decoder: levels in reverse, rb + 1 blocks each
            for i in range(rb + 1):
                expected[f"output_blocks.{(2 - level) * (rb + 1) + i}.1"] = full // factor**dims
    assert tokens == expected
    # heads: widths 16 and 32 with 8 channels per head
    for module in net.modules():
        if isinstance(module, AttentionBlock):
            assert module.heads == module.qkv.in_channels // 8


@pytest.mark.parametrize("channels,num_heads,head_channels,heads", [
    (32, 1, 8, 4), (32, 1, 32, 1), (16, 1, 32, 1), (32, 2, -1, 2), (48, 3, -1, 3), (64, 1, 16, 4),
])  # fmt: skip
@pytest.mark.parametrize("legacy", [True, False])
def test_attention_heads_compute_multi_head_attention(channels, num_heads, head_channels, heads, legacy):
    torch.manual_seed(0)
    block = AttentionBlock(channels, num_heads=num_heads, num_head_channels=head_channels,
                           groups=16, legacy_order=legacy)  # fmt: skip
    assert block.heads == heads
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        x = torch.randn(2, channels, 4, 6)
        got = block(x)
        # plain multi-head attention, written out
        b, n, width = 2, 24, channels // heads
        tokens = x.reshape(b, channels, n)
        qkv = block.qkv(block.norm(tokens))
        if legacy:  # per head: [q, k, v]
            q, k, v = qkv.reshape(b, heads, 3, width, n).unbind(2)
        else:  # [q of all heads, k, v]
            q, k, v = qkv.reshape(b, 3, heads, width, n).unbind(1)
        weights = torch.softmax(torch.einsum("bhcs,bhct->bhst", q, k) / math.sqrt(width), dim=-1)
        attended = torch.einsum("bhst,bhct->bhcs", weights, v).reshape(b, channels, n)
        expected = (tokens + block.proj_out(attended)).reshape(x.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_configuration_checked():
    with pytest.raises(InputError, match="attention width 48 is not a multiple of num_head_channels 32"):
        UNetConfig(**{**TINY, "channel_mults": (1, 3), "num_head_channels": 32})
    with pytest.raises(InputError, match="cannot be split into 3 heads"):
        UNetConfig(**{**TINY, "num_head_channels": -1, "num_heads": 3})
    with pytest.raises(InputError, match="downsampling factors"):
        UNetConfig(**{**TINY, "attention_resolutions": (0,)})
    # heads own no parameters: the same weights run with any head split
    a = _net(num_head_channels=8, attention_resolutions=(1,))
    b = UNet(UNetConfig(**{**TINY, "num_head_channels": 16, "attention_resolutions": (1,)}))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 8, 8)
    assert not torch.allclose(_run(a, x), _run(b.eval(), x), atol=1e-5)


# --------------------------------------------------------------------------------------
# index embedding
# --------------------------------------------------------------------------------------
def test_index_embedding_on_off():
    off = _net()
    on = _net(use_index_embedding=True, in_channels=3)
    bounded = _net(num_indices=5, in_channels=3)
    assert bounded.config.use_index_embedding  # a positive num_indices turns it on
    assert (off.config.emb_channels, on.config.emb_channels) == (64, 128)
    assert not hasattr(off, "channel_embed") and hasattr(on, "channel_embed")
    assert not any(k.startswith("channel_embed.") for k in off.state_dict())
    assert on.state_dict()["channel_embed.0.weight"].shape == (64, 16)
    assert on.state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape[1] == 128
    assert off.state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape[1] == 64
    x2, x3 = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 8, 8)
    with pytest.raises(InputError, match="pass index"):
        _run(on, x3)
    with pytest.raises(InputError, match="no index embedding"):
        _run(off, x2, index=torch.tensor([0, 1]))
    _run(on, x3, index=torch.tensor([0, 100]))  # num_indices 0: unbounded
    _run(bounded, x3, index=torch.tensor(4))  # one index for the whole batch
    for bad in (torch.tensor([0, 5]), torch.tensor([-1, 0])):
        with pytest.raises(InputError, match=r"indices 0\.\.4"):
            _run(bounded, x3, index=bad)


# --------------------------------------------------------------------------------------
# layout: the reference's parameter names, and the config's JSON round trip
# --------------------------------------------------------------------------------------
def test_reference_parameter_names():
    keys = UNet(UNetConfig(**{**TINY, "attention_resolutions": (2,)})).state_dict()
    for name in (
        "cond_embed.0.weight", "cond_embed.2.bias", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.2.0.in_layers.2.weight",  # the downsampling residual block
        "input_blocks.3.0.skip_connection.weight", "input_blocks.3.1.qkv.weight",
        "input_blocks.3.1.norm.weight", "input_blocks.3.1.proj_out.weight",
        "middle_block.0.in_layers.0.weight", "middle_block.1.qkv.weight",
        "middle_block.2.out_layers.3.bias", "output_blocks.0.0.skip_connection.weight",
        "output_blocks.3.2.in_layers.2.weight",  # an upsampling residual block after attention
        "out.0.weight", "out.2.weight",
    ):  # fmt: skip
        assert name in keys, name
    plain = UNet(UNetConfig(**{**TINY, "resblock_updown": False})).state_dict()
    assert "input_blocks.2.0.op.weight" in plain and "output_blocks.1.1.conv.weight" in plain
    y = _run(_randomized(UNet(UNetConfig(**{**TINY, "resblock_updown": False}))),
             torch.randn(1, 2, 8, 12))  # fmt: skip
    assert y.shape == (1, 1, 8, 12)


def test_norm_groups_follow_the_reference():
    assert UNetConfig(**TINY).groups == 16  # 16 base channels: 16 groups
    assert UNetConfig(**{**TINY, "base_channels": 32}).groups == 32
    net = UNet(UNetConfig(**{**TINY, "base_channels": 24, "num_head_channels": 8}))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in norms)  # lowered where 32 won't divide


def test_config_round_trip_and_unknown_field():
    config = UNetConfig(**{**TINY, "dims": 3, "attention_resolutions": (2, 4), "num_indices": 0})
    again = UNetConfig.from_dict(config.to_dict())
    assert again == config
    assert UNet(config.to_dict()).config == config  # a dict is accepted too
    with pytest.raises(InputError, match="unknown field"):
        UNetConfig.from_dict({**config.to_dict(), "width": 3})
    with pytest.raises(InputError, match="dims must be 2 or 3"):
        UNetConfig(dims=1)
