"""The posterior mean with calibrated intervals at one evaluation (issue 14, part 4).

A mean-plus-residual model with an error head (``mean_net.error_channels``, on for new
models) predicts σ of its mean's error; training ends by fitting the conformal scale that
turns σ into 90 % interval half-widths on held-out patches (``calibration["mean_interval"]``).
``enhance --samples 0`` then writes ``uncertainty/`` next to the mean: ``q · σ`` blended like
the mean, chunking-invariant, with attributes that say what it is. A model without a head
(or an uncalibrated one) writes the mean alone, as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy.ndimage import gaussian_filter

from emdiffuse.cli import main
from emdiffuse.io import write_image
from emdiffuse.models.calibration import mean_half_widths
from emdiffuse.models.checkpoints import load_checkpoint, save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.training import trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(size="tiny", batch_size=4, patch=16, lr=2e-3, warmup=2, val_every=1000, val_batch=2,
            val_steps=2, progress=False, region=32, val_fraction=0.25, device="cpu",
            calibration_patches=8, ema_decay=0.9, fit_steps=0)  # fmt: skip
RUN = dict(samples=0, tile=32, overlap=8, seed=0, scheduler="threads", progress=False,
           dtype="float32")  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A denoiser trained briefly on a smooth volume whose noise is weak in the left half of
    every slice and strong in the right half, so the error head has something to learn."""
    root = tmp_path_factory.mktemp("error_head")
    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((12, 64, 64)), (0, 2, 2)).astype(np.float32)
    clean = (clean - clean.min()) / np.ptp(clean)
    strength = np.where(np.arange(64) < 32, 0.02, 0.3)[None, None, :]
    noisy = (clean + rng.standard_normal(clean.shape) * strength).astype(np.float32)
    path = trainer.train("denoise", [noisy, clean], root / "model", steps=200,
                         objective="residual", **FAST)  # fmt: skip
    return {"path": str(path), "noisy": noisy, "clean": clean, "root": root}


def test_training_calibrates_the_error_head(trained):
    config, state = load_checkpoint(trained["path"])
    assert config.mean_net.error_channels > 0 and any(k.startswith("error.") for k in state)
    record = config.calibration["mean_interval"]
    assert record["level"] == 0.9 and record["scale"] > 0
    assert record["coverage"] >= 0.9  # split-conformal: at least the level on its own data
    # the head's σ, read through the enhancer, is what the record was fitted on
    enhancer = Enhancer.load(trained["path"])
    cond = enhancer.condition_normalization.forward(trained["noisy"][:2, None])
    mean, sigma = enhancer.posterior_mean_and_sigma(cond.astype(np.float32))
    assert sigma.shape == mean.shape and np.all(sigma > 0) and np.ptp(sigma) > 0


def _volume(data: np.ndarray, path) -> str:
    write_image(data, path, voxel_size=(8.0, 8.0, 8.0))
    return str(path)


def test_mean_only_writes_chunking_invariant_half_widths_and_says_so(trained, tmp_path, capsys):
    source = _volume(trained["noisy"][:4], tmp_path / "in.zarr")
    a = enhance(source, trained["path"], tmp_path / "a.zarr", chunks=(4, 64, 64), **RUN)
    b = enhance(source, trained["path"], tmp_path / "b.zarr", chunks=(1, 24, 40), **RUN)
    width_a = np.asarray(zarr.open_group(str(tmp_path / "a.zarr" / "uncertainty"))["0"][...])
    width_b = np.asarray(zarr.open_group(str(tmp_path / "b.zarr" / "uncertainty"))["0"][...])
    np.testing.assert_allclose(width_a, width_b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    config, _ = load_checkpoint(trained["path"])
    record = config.calibration["mean_interval"]
    half_range = Enhancer.load(trained["path"]).normalization.half_range
    floor = float(mean_half_widths(np.zeros(1), record)[0]) * half_range
    assert width_a.shape == trained["noisy"][:4].shape and width_a.min() >= floor * (1 - 1e-5)
    # the intervals hold on the data the model saw, about as calibrated
    error = np.abs(np.asarray(a) - trained["clean"][:4])
    assert 0.8 <= np.mean(error <= width_a) <= 1.0
    attrs = dict(zarr.open_group(str(tmp_path / "a.zarr" / "uncertainty"), mode="r").attrs)
    info = attrs["emdiffuse"]
    assert (info["uncertainty"], info["level"], info["samples"], info["source"]) == (
        "half-width", 0.9, 0, "error head")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a.zarr")]) == 0
    assert "of the mean, from the model's error head" in capsys.readouterr().out


def test_a_model_without_a_calibrated_head_writes_the_mean_alone(trained, tmp_path):
    config, state = load_checkpoint(trained["path"])
    calibration = {k: v for k, v in config.calibration.items() if k != "mean_interval"}
    plain = save_checkpoint(tmp_path / "plain.safetensors", state,
                            config.replace(calibration=calibration))  # fmt: skip
    source = _volume(trained["noisy"][:2], tmp_path / "in.zarr")
    out = enhance(source, plain, tmp_path / "out.zarr", **RUN)
    assert not (tmp_path / "out.zarr" / "uncertainty").exists()
    with_head = enhance(source, trained["path"], tmp_path / "head.zarr", **RUN)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(with_head))  # the same mean
