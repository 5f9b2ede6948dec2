"""Variants: contracts, presets, JSON round trip and validation of ModelConfig."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.presets import make_config
from emdiffuse.models.unet import UNet
from emdiffuse.models.variants import REFERENCE_SCHEDULE, ModelConfig

CONTRACTS = [
    # variant, k, in_slices, out_slices, xy_scale, z_scale
    ("emdiffuse-n", 1, 1, 1, 1, 1),
    ("emdiffuse-r", 2, 1, 1, 2, 1),
    ("emdiffuse-r", 4, 1, 1, 4, 1),
    ("vemdiffuse-i", 4, 2, 3, 1, 4),
    ("vemdiffuse-i", 6, 2, 5, 1, 6),
    ("vemdiffuse-a", 10, 2, 9, 1, 10),
]


@pytest.mark.parametrize("variant,k,ins,outs,xy,z", CONTRACTS)
def test_contracts(variant, k, ins, outs, xy, z):
    config = make_config(variant, "tiny", scale_factor=k)
    assert (config.in_slices, config.out_slices, config.xy_scale, config.z_scale) == (
        ins,
        outs,
        xy,
        z,
    )
    # output-channel layout: one pass makes every output slice
    assert config.unet.in_channels == ins + outs
    assert config.unet.out_channels == outs
    assert config.passes == 1


@pytest.mark.parametrize("k", [4, 6, 10])
def test_index_embedding_layout(k):
    config = make_config("vemdiffuse-i", "tiny", scale_factor=k, use_index_embedding=True)
    assert config.out_slices == k - 1
    assert (config.unet.in_channels, config.unet.out_channels) == (3, 1)
    assert config.passes == k - 1
    net = UNet(config.unet).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = net(x, torch.tensor([0.5, 0.9]), index=torch.tensor([0, k - 2]))
    assert y.shape == (2, 1, 16, 16)


def test_reference_size_matches_published_network():
    config = make_config("emdiffuse-n", "reference")
    u = config.unet
    assert u.base_channels == 32
    assert tuple(u.channel_mults) == (1, 2, 4, 8)
    assert u.num_res_blocks == 2
    assert tuple(u.attention_resolutions) == (16,)
    assert u.dropout == pytest.approx(0.2)
    assert config.schedule == REFERENCE_SCHEDULE
    assert (config.prediction, config.loss) == ("eps", "mse")


@pytest.mark.parametrize("variant", ["emdiffuse-n", "emdiffuse-r", "vemdiffuse-i", "vemdiffuse-a"])
@pytest.mark.parametrize("size", ["tiny", "small", "reference"])
def test_json_round_trip(variant, size):
    config = make_config(
        variant,
        size,
        prediction="v",
        normalization={"low": 12.5, "high": 230.0},
        voxel_size_nm=(8.0, 4.0, 4.0),
        training_data="synthetic, seed 3",
    )
    text = config.to_json()
    json.loads(text)  # plain JSON
    again = ModelConfig.from_json(text)
    assert again == config
    assert again.to_json() == text


def test_tiny_is_cheap():
    """The tiny preset (demo, tests) costs a fraction of the reference network: counted in
    floating-point operations of one 64x64 evaluation, not timed (timing belongs in
    benchmarks/, where a loaded machine cannot fail the suite)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for size in ("tiny", "reference"):
        net = UNet(make_config("emdiffuse-n", size).unet).eval()
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            y = net(torch.randn(1, 2, 64, 64), torch.tensor([0.5]))
        assert y.shape == (1, 1, 64, 64)
        flops[size] = counter.get_total_flops()
    assert flops["tiny"] < 1e9  # 0.6 GFLOP: milliseconds on one CPU core
    assert flops["tiny"] < flops["reference"] / 8


def test_3d_preset_shape():
    config = make_config("emdiffuse-n", "tiny", dims=3)
    assert config.dims == 3
    net = UNet(config.unet).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 2, 8, 16, 16), torch.tensor([0.7]))
    assert y.shape == (1, 1, 8, 16, 16)


def test_3d_isotropic_refused():
    with pytest.raises(InputError, match="unet.dims"):
        make_config("vemdiffuse-i", "tiny", dims=3)


def _dict(**changes):
    data = make_config("vemdiffuse-i", "tiny", scale_factor=4).to_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"variant": "emdiffuse-x"}, "unknown variant 'emdiffuse-x'"),
        ({"task": "deblur"}, "unknown task 'deblur'"),
        ({"task": "denoise"}, "task"),
        ({"scale_factor": 1}, "scale_factor"),
        ({"scale_factor": 2.5}, "scale_factor"),
        ({"scale_factor": 6}, "unet.in_channels"),
        ({"prediction": "score"}, "prediction"),
        ({"loss": "huber"}, "loss"),
        ({"schedule": {"kind": "sigmoid", "steps": 10}}, "schedule.kind"),
        ({"normalization": {"low": 5.0, "high": 1.0}}, "normalization"),
        ({"voxel_size_nm": [0, 4, 4]}, "voxel_size_nm"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_validation_names_the_field(changes, match):
    with pytest.raises(InputError, match=match):
        ModelConfig.from_json(json.dumps(_dict(**changes)))


def test_inconsistent_channels_named():
    config = make_config("emdiffuse-n", "tiny")
    bad_unet = dataclasses.replace(config.unet, out_channels=3)
    with pytest.raises(InputError, match="unet.out_channels is 3"):
        dataclasses.replace(config, unet=bad_unet)
    bad_unet = dataclasses.replace(config.unet, in_channels=5)
    with pytest.raises(InputError, match="unet.in_channels is 5"):
        dataclasses.replace(config, unet=bad_unet)


def test_missing_field_and_bad_json():
    data = _dict()
    del data["unet"]
    with pytest.raises(InputError, match="missing field 'unet'"):
        ModelConfig.from_dict(data)
    with pytest.raises(InputError, match="not valid JSON"):
        ModelConfig.from_json("{not json")
    with pytest.raises(InputError, match="unknown model size"):
        make_config("emdiffuse-n", "huge")


def test_describe():
    assert make_config("vemdiffuse-i", scale_factor=4).describe() == "vemdiffuse-i (isotropic, z×4)"
    assert make_config("emdiffuse-r", scale_factor=2).describe() == (
        "emdiffuse-r (super-resolve, xy×2)"
    )


@pytest.mark.parametrize("kind", ["sr3", "residual"])
def test_z_context_widens_the_condition_of_isotropic_models_only(kind):
    """``z_context`` c: an isotropic model reads 2 + 2c slices (both of its networks); the
    JSON round trip keeps it, a config from before the field reads as 0, and it is refused
    where it means nothing."""
    config = make_config("vemdiffuse-i", "tiny", scale_factor=4, kind=kind, z_context=1)
    assert (config.in_slices, config.out_slices) == (4, 3)
    assert config.net_cond_channels == 4 + (3 if kind == "residual" else 0)
    if kind == "residual":
        assert config.mean_net.in_channels == 4
    again = ModelConfig.from_json(config.to_json())
    assert again == config and again.z_context == 1
    assert config.describe() == "vemdiffuse-i (isotropic, z×4, 4 input slices)"
    old = json.loads(make_config("vemdiffuse-i", "tiny", kind=kind).to_json())
    old.pop("z_context")
    assert ModelConfig.from_dict(old).in_slices == 2
    with pytest.raises(InputError, match="denoising and isotropic.*emdiffuse-r reads one slice"):
        make_config("emdiffuse-r", "tiny", z_context=1)
    with pytest.raises(InputError, match="index-embedding"):
        make_config("vemdiffuse-i", "tiny", use_index_embedding=True, z_context=1)
    with pytest.raises(InputError, match="z_context must be an integer in 0..3, got 9"):
        make_config("vemdiffuse-i", "tiny", z_context=9)
    from emdiffuse.models.networks import baseline_weights

    assert baseline_weights(config) == [
        [0.0, 0.75, 0.25, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.25, 0.75, 0.0]
    ]


@pytest.mark.parametrize("kind", ["sr3", "residual"])
def test_denoise_z_context_reads_the_slice_and_its_neighbours(kind):
    """A denoiser with z context c reads 1 + 2c slices (both of its networks), its
    input-alone baseline is the middle one, and a 3D network (which sees z already) refuses
    a context."""
    from emdiffuse.models.networks import baseline_weights

    config = make_config("emdiffuse-n", "tiny", kind=kind, z_context=1)
    assert (config.in_slices, config.out_slices) == (3, 1)
    assert config.net_cond_channels == 3 + (1 if kind == "residual" else 0)
    if kind == "residual":
        assert config.mean_net.in_channels == 3
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.describe() == "emdiffuse-n (denoise, 3 input slices)"
    assert baseline_weights(config) == [[0.0, 1.0, 0.0]]
    with pytest.raises(InputError, match="3D network sees its neighbouring slices"):
        make_config("emdiffuse-n", "tiny", dims=3, z_context=1)
