"""Enhancer: shape contracts of every variant, determinism, loading, normalisation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.normalization import denormalize, normalize
from emdiffuse.models.presets import make_config
from emdiffuse.models.sampler_names import SAMPLER_NAMES

STEPS = 2  # shapes and determinism do not need many steps


def _inputs(enhancer: Enhancer, b: int, h: int, w: int, seed: int = 0, n_out=None):
    rng = np.random.default_rng(seed)
    cond = rng.uniform(-1, 1, (b, enhancer.in_slices, h, w)).astype(np.float32)
    k = enhancer.xy_scale
    n_out = enhancer.out_slices if n_out is None else n_out
    noise = rng.standard_normal((b, n_out, h * k, w * k)).astype(np.float32)
    return cond, noise


def _check_out(out, shape):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == shape
    assert np.isfinite(out).all()
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_denoise_2d_shapes():
    enhancer = Enhancer.from_config(make_config("emdiffuse-n", "tiny"))
    assert (enhancer.in_slices, enhancer.out_slices, enhancer.xy_scale, enhancer.z_scale) == (
        1,
        1,
        1,
        1,
    )
    assert enhancer.multiple == 4
    assert not enhancer.net.training
    cond, noise = _inputs(enhancer, 2, 32, 48)
    out = enhancer.enhance(cond, noise, steps=STEPS)
    _check_out(out, (2, 1, 32, 48))
    assert not np.array_equal(out, cond)  # it did something


@pytest.mark.parametrize("k", [2, 4])
def test_super_resolution_shapes(k):
    enhancer = Enhancer.from_config(make_config("emdiffuse-r", "tiny", scale_factor=k))
    assert (enhancer.xy_scale, enhancer.z_scale) == (k, 1)
    assert enhancer.multiple % k == 0 and enhancer.multiple % 4 == 0
    h = 32 // k
    cond, noise = _inputs(enhancer, 1, h, h)
    out = enhancer.enhance(cond, noise, steps=STEPS)
    _check_out(out, (1, 1, 32, 32))
    # an input tile whose upsampled side is not a multiple of the network's is refused
    if k == 2:  # tiny nets downsample 4x: a 17-pixel input makes a 34-pixel output
        with pytest.raises(InputError, match="multiple of 4"):
            enhancer.enhance(*_inputs(enhancer, 1, 17, h), steps=STEPS)


def test_super_resolution_upsamples_cond_itself():
    enhancer = Enhancer.from_config(make_config("emdiffuse-r", "tiny", scale_factor=4))
    flat = torch.full((1, 1, 8, 8), 0.25)
    up = enhancer._upsample(flat)
    assert up.shape == (1, 1, 32, 32)
    assert torch.allclose(up, torch.full_like(up, 0.25), atol=1e-6)


@pytest.mark.parametrize("k", [4, 6, 10])
@pytest.mark.parametrize("index_mode", [False, True])
def test_isotropic_shapes(k, index_mode):
    config = make_config("vemdiffuse-i", "tiny", scale_factor=k, use_index_embedding=index_mode)
    enhancer = Enhancer.from_config(config)
    assert (enhancer.in_slices, enhancer.out_slices, enhancer.xy_scale, enhancer.z_scale) == (
        2,
        k - 1,
        1,
        k,
    )
    cond, noise = _inputs(enhancer, 2, 16, 16)
    out = enhancer.enhance(cond, noise, steps=1)
    _check_out(out, (2, k - 1, 16, 16))
    # the k-1 slices are not copies of one another
    assert not np.allclose(out[:, 0], out[:, -1])


def test_index_mode_single_index_matches_full_run():
    config = make_config("vemdiffuse-a", "tiny", scale_factor=4, use_index_embedding=True)
    enhancer = Enhancer.from_config(config, seed=3)
    cond, noise = _inputs(enhancer, 1, 16, 16)
    full = enhancer.enhance(cond, noise, sampler="ddim", steps=STEPS)
    one = enhancer.enhance(cond, noise[:, 2:3], sampler="ddim", steps=STEPS, index=2)
    assert one.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(one[:, 0], full[:, 2], atol=1e-5)
    with pytest.raises(InputError, match="out of range"):
        enhancer.enhance(cond, noise[:, :1], steps=STEPS, index=3)


def test_3d_denoise_shapes():
    enhancer = Enhancer.from_config(make_config("emdiffuse-n", "tiny", dims=3))
    rng = np.random.default_rng(0)
    cond = rng.uniform(-1, 1, (1, 1, 8, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((1, 1, 8, 16, 16)).astype(np.float32)
    out = enhancer.enhance(cond, noise, steps=1)
    _check_out(out, (1, 1, 8, 16, 16))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_deterministic_given_noise(sampler):
    config = make_config("emdiffuse-n", "tiny", prediction="v")
    a = Enhancer.from_config(config, seed=1)
    b = Enhancer.from_config(config, seed=1)  # same seed -> same weights
    cond, noise = _inputs(a, 2, 16, 16, seed=5)
    out_a = a.enhance(cond, noise, sampler=sampler, steps=4)
    out_b = b.enhance(cond.copy(), noise.copy(), sampler=sampler, steps=4)
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(out_a, a.enhance(cond, noise, sampler=sampler, steps=4))
    other_noise = _inputs(a, 2, 16, 16, seed=6)[1]
    assert not np.allclose(out_a, a.enhance(cond, other_noise, sampler=sampler, steps=4))
    # each batch item depends only on its own tile
    single = a.enhance(cond[1:], noise[1:], sampler=sampler, steps=4)
    np.testing.assert_allclose(single[0], out_a[1], atol=1e-5)


def test_ddpm_uses_step_noise():
    enhancer = Enhancer.from_config(make_config("emdiffuse-n", "tiny"))
    cond, noise = _inputs(enhancer, 1, 16, 16)

    def step_noise(seed):
        return lambda i: (
            np.random.default_rng((seed, i)).standard_normal(noise.shape).astype(np.float32)
        )

    one = enhancer.enhance(cond, noise, sampler="ddpm", steps=3, step_noise=step_noise(0))
    again = enhancer.enhance(cond, noise, sampler="ddpm", steps=3, step_noise=step_noise(0))
    other = enhancer.enhance(cond, noise, sampler="ddpm", steps=3, step_noise=step_noise(1))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, other)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_listed_sampler_runs_and_is_keyed_on_its_noise(sampler):
    """Every sampler the CLI and the pipeline offer runs in the Enhancer; given the same
    starting and step noise it repeats itself exactly (the pipeline's noise is keyed on
    global coordinates, so a rerun or another chunking must give the same tile)."""
    from emdiffuse._cli import enhance as enhance_cli
    from emdiffuse.cli import build_parser

    enhancer = Enhancer.from_config(make_config("emdiffuse-n", "tiny"))
    cond, noise = _inputs(enhancer, 2, 16, 16)

    def step_noise(i):
        return np.random.default_rng((7, i)).standard_normal(noise.shape).astype(np.float32)

    one = enhancer.enhance(cond, noise, sampler=sampler, steps=3, step_noise=step_noise)
    again = enhancer.enhance(cond, noise, sampler=sampler, steps=3, step_noise=step_noise)
    _check_out(one, noise.shape)
    np.testing.assert_array_equal(one, again)
    args = build_parser().parse_args(["enhance", "in", "out", "--model", "m", "--sampler", sampler])
    assert args.sampler == sampler and enhance_cli.run is args._run


def test_spacing_reaches_the_sampler():
    """``spacing`` changes the result of a few-step run, and the default is the sampler's
    own spacing (logsnr for dpmpp_2m_sde)."""
    enhancer = Enhancer.from_config(make_config("emdiffuse-n", "tiny"), seed=3)
    cond, noise = _inputs(enhancer, 1, 16, 16)

    def step_noise(i):
        return np.random.default_rng((5, i)).standard_normal(noise.shape).astype(np.float32)

    run = {"sampler": "dpmpp_2m_sde", "steps": 4, "step_noise": step_noise}
    default = enhancer.enhance(cond, noise, **run)
    logsnr = enhancer.enhance(cond, noise, spacing="logsnr", **run)
    karras = enhancer.enhance(cond, noise, spacing="karras", **run)
    np.testing.assert_array_equal(default, logsnr)
    assert np.abs(karras - logsnr).max() > 1e-3


@pytest.mark.parametrize("variant,k", [("emdiffuse-n", 1), ("emdiffuse-r", 2)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_inputs_not_modified(variant, k, sampler):
    enhancer = Enhancer.from_config(make_config(variant, "tiny", scale_factor=k))
    cond, noise = _inputs(enhancer, 1, 8, 8)
    cond0, noise0 = cond.copy(), noise.copy()
    step = noise.copy()
    enhancer.enhance(cond, noise, sampler=sampler, steps=3, step_noise=lambda i: step)
    np.testing.assert_array_equal(cond, cond0)
    np.testing.assert_array_equal(noise, noise0)
    np.testing.assert_array_equal(step, noise0)


def test_seeded_init():
    config = make_config("emdiffuse-n", "tiny")
    a = Enhancer.from_config(config, seed=0).net.state_dict()
    b = Enhancer.from_config(config, seed=0).net.state_dict()
    c = Enhancer.from_config(config, seed=1).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_load_matches_from_config(tmp_path):
    config = make_config("vemdiffuse-i", "tiny", scale_factor=4)
    source = Enhancer.from_config(config, seed=7)
    state = source.net.state_dict()
    path = save_checkpoint(tmp_path / "iso.safetensors", state, config)
    loaded = Enhancer.load(path, device="cpu", precision="fp32")
    assert loaded.config == config
    cond, noise = _inputs(loaded, 1, 16, 16)
    np.testing.assert_array_equal(
        loaded.enhance(cond, noise, steps=STEPS), source.enhance(cond, noise, steps=STEPS)
    )
    with pytest.raises(InputError, match="asks for denoise"):
        Enhancer.load(path, expect_task="denoise")


def test_bad_calls():
    enhancer = Enhancer.from_config(make_config("emdiffuse-n", "tiny"))
    cond, noise = _inputs(enhancer, 1, 16, 16)
    with pytest.raises(InputError, match="slices"):
        enhancer.enhance(np.concatenate([cond, cond], 1), noise)
    with pytest.raises(InputError, match="noise has shape"):
        enhancer.enhance(cond, noise[..., :8])
    with pytest.raises(InputError, match="cond must be"):
        enhancer.enhance(cond[0], noise)
    with pytest.raises(InputError, match="multiple"):
        enhancer.enhance(*_inputs(enhancer, 1, 18, 16))
    with pytest.raises(InputError, match="unknown sampler"):
        enhancer.enhance(cond, noise, sampler="euler-a")
    with pytest.raises(InputError, match="steps"):
        enhancer.enhance(cond, noise, steps=0)
    with pytest.raises(InputError, match="unknown spacing"):
        enhancer.enhance(cond, noise, spacing="uniform")
    with pytest.raises(InputError, match="only for isotropic"):
        enhancer.enhance(cond, noise, index=0)
    with pytest.raises(InputError, match="precision"):
        Enhancer.from_config(make_config("emdiffuse-n", "tiny"), precision="int8")


def test_enhance_callback_per_step_does_not_change_results():
    enhancer = Enhancer.from_config(make_config("emdiffuse-r", "tiny", scale_factor=2))
    cond, noise = _inputs(enhancer, 1, 8, 8)
    plain = enhancer.enhance(cond, noise, sampler="dpmpp_2m", steps=3)
    seen = []
    out = enhancer.enhance(cond, noise, sampler="dpmpp_2m", steps=3, callback=seen.append)
    np.testing.assert_array_equal(out, plain)
    assert [info["i"] for info in seen] == [0, 1, 2]
    assert all(info["x"].shape == info["denoised"].shape == (1, 1, 16, 16) for info in seen)
    assert seen[-1]["alpha_bar_next"] == 1.0
    # index-embedding isotropic models: once per step for each in-between slice
    config = make_config("vemdiffuse-i", "tiny", scale_factor=3, use_index_embedding=True)
    iso = Enhancer.from_config(config)
    cond, noise = _inputs(iso, 1, 8, 8)
    seen.clear()
    iso.enhance(cond, noise, sampler="ddim", steps=2, callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 0, 1]


def test_normalize_round_trip():
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 100.0, "high": 300.0})
    raw = np.array([100, 200, 300, 50, 400], dtype=np.uint16)
    x = normalize(raw, config)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1, 0, 1, -1, 1])
    np.testing.assert_allclose(normalize(raw, config, clip=False), [-1, 0, 1, -1.5, 2])
    back = denormalize(x, config, dtype=np.uint16)
    np.testing.assert_array_equal(back, [100, 200, 300, 100, 300])
    assert denormalize(np.array([-3.0, 3.0]), config, dtype=np.uint8).tolist() == [0, 255]
    np.testing.assert_allclose(denormalize(x[:3], {"low": 100.0, "high": 300.0}), [100, 200, 300])


def test_models_do_not_import_dask_or_zarr():
    code = (
        "import sys, emdiffuse.models.enhancer, emdiffuse.models.checkpoints;"
        "bad = [m for m in ('dask', 'zarr', 'xarray', 'emdiffuse.pipeline') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
