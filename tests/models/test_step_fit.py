"""Few-step schedules fitted to a model (models/step_fit.py, ``spacing="fitted"``).

The fit is checked where the answer is known: a Gaussian field, whose denoiser and whose
probability-flow solution are exact per frequency, like EM's residual much stronger at
coarse scales than fine ones. Then the Enhancer's side (fit, store, walk exactly the stored
schedule, refuse what the model has no schedule for) on a tiny residual model, and the
record's checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from perturbed import perturbed_checkpoint

from emdiffuse.errors import InputError
from emdiffuse.models import sampler_names, samplers, step_fit
from emdiffuse.models.checkpoints import load_checkpoint
from emdiffuse.models.diffusion import Schedule
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config
from emdiffuse.models.variants import ModelConfig

SIDE = 32


def _variance() -> torch.Tensor:
    """Per-frequency variance of the field (rfft2 layout): strong coarse structure, a
    weak fine texture."""
    ky = torch.fft.fftfreq(SIDE)[:, None]
    kx = torch.fft.rfftfreq(SIDE)[None, :]
    return 6.0 / (1 + ((ky**2 + kx**2).sqrt() / 0.05) ** 2) ** 1.5 + 0.01


def _gaussian_denoiser(variance: torch.Tensor):
    """The exact x0 estimate of the Gaussian field at alpha-bar ``a``, per frequency."""

    def denoise(x: torch.Tensor, a: float) -> torch.Tensor:
        a = float(a)
        gain = math.sqrt(a) * variance / (a * variance + 1 - a)
        return torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * gain, s=x.shape[-2:],
                                norm="ortho")  # fmt: skip

    return denoise


def _exact(x_T: torch.Tensor, a0: float, variance: torch.Tensor) -> torch.Tensor:
    """The probability-flow solution from ``x_T`` at alpha-bar ``a0``: each frequency keeps
    its standardised value, so it ends at ``sqrt(variance)`` times it."""
    scale = variance.sqrt() / (a0 * variance + 1 - a0).sqrt()
    return torch.fft.irfft2(torch.fft.rfft2(x_T, norm="ortho") * scale, s=x_T.shape[-2:],
                            norm="ortho")  # fmt: skip


def test_a_fitted_schedule_lands_nearer_the_exact_solution_on_fresh_noise():
    variance = _variance()
    denoise = _gaussian_denoiser(variance)
    sample = samplers.sample_dpmpp_2m
    schedule = Schedule()
    start = schedule.timesteps(4, "logsnr")
    a0 = float(start[0])
    fit_noise = torch.randn((8, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(0))
    fine = sample(denoise, fit_noise, schedule.timesteps(step_fit.REFERENCE_STEPS, "logsnr"))
    exact = _exact(fit_noise, a0, variance)
    # the fine solution the fit aims at is the exact one, to 1 % of the field's RMS
    assert float((fine - exact).pow(2).mean().sqrt()) < 1e-2 * float(exact.pow(2).mean().sqrt())

    fitted = step_fit.fit_sigmas(lambda a: sample(denoise, fit_noise, a), start, fine)
    sigmas = fitted["sigmas"]
    low, high = step_fit.sigmas_from_alphas(start)[-1], step_fit.sigmas_from_alphas(start)[0]
    assert len(sigmas) == 4 and all(b < a for a, b in zip(sigmas, sigmas[1:], strict=False))
    assert low * (1 - 1e-4) <= sigmas[-1] and sigmas[0] <= high * (1 + 1e-4)
    assert fitted["rms"] < 0.7 * fitted["rms_logsnr"]

    # on noise it was not fitted on, it is as much nearer the exact solution
    new_noise = torch.randn((8, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
    truth = _exact(new_noise, a0, variance)

    def error(alphas: torch.Tensor) -> float:
        return float((sample(denoise, new_noise, alphas) - truth).pow(2).mean().sqrt())

    assert error(step_fit.alphas_from_sigmas(sigmas)) < 0.7 * error(start)


def test_sigmas_and_alphas_convert_both_ways():
    alphas = Schedule().timesteps(5, "karras")
    back = step_fit.alphas_from_sigmas(step_fit.sigmas_from_alphas(alphas))
    torch.testing.assert_close(back, alphas, rtol=1e-9, atol=1e-12)


def _residual_config() -> ModelConfig:
    return make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                       kind="residual")  # fmt: skip


def _batch(b=4, side=16, seed=0):
    rng = np.random.default_rng(seed)
    cond = rng.uniform(-1, 1, (b, 1, side, side)).astype(np.float32)
    noise = rng.standard_normal((b, 1, side, side)).astype(np.float32)
    return cond, noise


def test_a_model_fits_stores_and_walks_its_schedule(tmp_path):
    path = perturbed_checkpoint(_residual_config(), tmp_path / "r.safetensors")
    enhancer = Enhancer.load(path)
    cond, noise = _batch(b=2)
    fitted = enhancer.fit_step_schedule(cond, noise, 2)
    assert fitted["rms"] <= fitted["rms_logsnr"] and len(fitted["sigmas"]) == 2
    record = {"sampler": "dpmpp_2m", "reference_steps": step_fit.REFERENCE_STEPS,
              "patches": 2, "schedules": {"2": fitted}}  # fmt: skip
    config = enhancer.config.replace(step_schedules=record)
    # the record survives the JSON round trip
    assert ModelConfig.from_json(config.to_json()).step_schedules == config.step_schedules
    model = Enhancer(config, enhancer.net)

    seen: list[float] = []
    out = model.enhance(cond, noise, sampler="dpmpp_2m", steps=2, spacing="fitted",
                        callback=lambda info: seen.append(info["alpha_bar"]))  # fmt: skip
    expected = step_fit.alphas_from_sigmas(fitted["sigmas"])[:-1]
    np.testing.assert_allclose(seen, expected.numpy(), rtol=1e-12)
    logsnr = model.enhance(cond, noise, sampler="dpmpp_2m", steps=2, spacing="logsnr")
    assert np.abs(out - logsnr).max() > 1e-4  # another schedule, another sample
    # by default the model walks its fitted schedule (here its only one, 2 steps) ...
    np.testing.assert_array_equal(model.enhance(cond, noise), out)
    np.testing.assert_array_equal(model.enhance(cond, noise, steps=2), out)
    # ... and other step counts their sampler's own spacing, as a model without schedules
    np.testing.assert_array_equal(model.enhance(cond, noise, steps=3),
                                  model.enhance(cond, noise, steps=3, spacing="logsnr"))  # fmt: skip
    np.testing.assert_array_equal(enhancer.enhance(cond, noise),
                                  enhancer.enhance(cond, noise, steps=8, spacing="logsnr"))  # fmt: skip

    with pytest.raises(InputError, match=r"dpmpp_2m@2, not dpmpp_2m@4"):
        model.enhance(cond, noise, sampler="dpmpp_2m", steps=4, spacing="fitted")
    with pytest.raises(InputError, match=r"not ddim@2"):
        model.enhance(cond, noise, sampler="ddim", steps=2, spacing="fitted")
    with pytest.raises(InputError, match="has none"):
        enhancer.enhance(cond, noise, sampler="dpmpp_2m", steps=2, spacing="fitted")
    with pytest.raises(InputError, match="start_noise needs logsnr or karras"):
        model.enhance(cond, noise, sampler="dpmpp_2m", steps=2, spacing="fitted", start_noise=2)


def test_sr3_models_have_no_fitted_schedule(tmp_path, denoise_checkpoint):
    sr3 = Enhancer.load(denoise_checkpoint)
    cond, noise = _batch()
    with pytest.raises(InputError, match="mean-plus-residual"):
        sr3.fit_step_schedule(cond, noise, 4)
    with pytest.raises(InputError, match="has none"):
        sr3.enhance(cond, noise, sampler="dpmpp_2m", steps=4, spacing="fitted")
    record = {"sampler": "dpmpp_2m", "reference_steps": 64, "patches": 4,
              "schedules": {"2": {"sigmas": [3.0, 0.1], "rms": 0.1, "rms_logsnr": 0.2}}}  # fmt: skip
    with pytest.raises(InputError, match="belong to kind 'residual'"):
        load_checkpoint(denoise_checkpoint)[0].replace(step_schedules=record)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patches": None, "extra": 1}, "step_schedules needs"),
        ({"schedules": {}}, "must map step counts"),
        ({"schedules": {"two": {"sigmas": [1.0, 0.1], "rms": 0, "rms_logsnr": 0}}}, "step count"),
        ({"schedules": {"2": {"sigmas": [1.0, 0.1]}}}, "needs"),
        ({"schedules": {"2": {"sigmas": [0.1, 1.0], "rms": 0, "rms_logsnr": 0}}}, "decreasing"),
        ({"schedules": {"2": {"sigmas": [1.0], "rms": 0, "rms_logsnr": 0}}}, "2 positive"),
        ({"schedules": {"2": {"sigmas": [1.0, -0.1], "rms": 0, "rms_logsnr": 0}}}, "positive"),
        ({"schedules": {"2": {"sigmas": "ab", "rms": 0, "rms_logsnr": 0}}}, "positive"),
    ],
)
def test_a_malformed_step_schedule_record_is_refused(change, message):
    record = {"sampler": "dpmpp_2m", "reference_steps": 64, "patches": 4,
              "schedules": {"2": {"sigmas": [3.0, 0.1], "rms": 0.1, "rms_logsnr": 0.2}}}  # fmt: skip
    record.update(change)
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(InputError, match=message):
        _residual_config().replace(step_schedules=record)


@pytest.mark.parametrize(
    ("sampler", "steps", "spacing", "start_noise", "want"),
    [
        ("dpmpp_2m", None, None, None, (4, "fitted")),  # the fitted default count
        ("dpmpp_2m", 2, None, None, (2, "fitted")),  # any fitted count
        ("dpmpp_2m", 3, None, None, (3, "logsnr")),  # not fitted: the sampler's default
        ("dpmpp_2m", None, "logsnr", None, (8, "logsnr")),  # another spacing asked for
        ("dpmpp_2m", None, "fitted", None, (4, "fitted")),
        ("dpmpp_2m", None, None, 1.5, (8, "logsnr")),  # a truncated start: never fitted
        ("ddpm", None, None, None, (8, "time")),  # fitted for another sampler
        ("ddim", 4, None, None, (4, "logsnr")),
    ],
)
def test_the_default_sampling_is_the_models_fitted_schedule(sampler, steps, spacing, start_noise, want):
    record = {"sampler": "dpmpp_2m", "schedules": {"2": {}, "4": {}}}
    got = sampler_names.default_sampling(sampler, steps, spacing, record, start_noise)
    assert got == want


def test_without_fitted_schedules_the_default_sampling_is_eight_steps():
    only_two = {"sampler": "dpmpp_2m", "schedules": {"2": {}}}
    assert sampler_names.default_sampling("dpmpp_2m", None, None, only_two) == (2, "fitted")
    assert sampler_names.default_sampling("dpmpp_2m", None, None, None) == (8, "logsnr")
    assert sampler_names.default_sampling("ddpm", None, None, None) == (8, "time")
    assert sampler_names.default_sampling("dpmpp_2m", None, "fitted", None) == (8, "fitted")
    with pytest.raises(InputError, match="unknown sampler"):
        sampler_names.default_sampling("euler", None, None, None)
    with pytest.raises(InputError, match="unknown spacing"):
        sampler_names.default_sampling("dpmpp_2m", 4, "cosine", only_two)
