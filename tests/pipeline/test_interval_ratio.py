"""Calibrated intervals for a run that samples otherwise than the calibration was fitted:
the half-widths are rescaled by the ratio of the two samplings' spreads, measured on the run's
central tiles before the run (:mod:`emdiffuse.pipeline.correlation`).

Fitted on ``dpmpp_2m`` at 8 steps, the demo's intervals covered 84 % at 90 % with 4 steps or
``ddim`` (their samples spread 0.67-0.70× as much, the error of the mean hardly moves;
benchmarks/results/interval_coverage.md). Before this change every sampling wrote the
calibrated half-widths unscaled.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from perturbed import perturbed_checkpoint

from emdiffuse.cli import main
from emdiffuse.models.calibration import half_widths
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline import correlation
from emdiffuse.pipeline.correlation import calibrated_ratio, spread_ratio
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.run_record import read_run_config
from emdiffuse.pipeline.settings import RunSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(tile=16, overlap=4, scheduler="threads", progress=False, dtype="float32", samples=2,
           sampler="ddim")  # fmt: skip
SHAPE = (2, 40, 44)
RECORD = {"level": 0.9, "scale": 1.5, "samples": 2, "floor": 1e-3, "sampler": "ddim"}


class Interrupt(RuntimeError):
    pass


def _model(tmp_path, steps: int, rho: float = 0.3) -> str:
    """The same weights, with a calibration record fitted on ``ddim`` at ``steps``."""
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    config.calibration = {**RECORD, "steps": steps, "residual_correlation": rho}
    config.validate()
    return perturbed_checkpoint(config, tmp_path / f"fitted_at_{steps}.safetensors")


def _uncertainty(path) -> tuple[np.ndarray, dict]:
    group = zarr.open_group(str(path / "uncertainty"), mode="r")
    return group["0"][...], dict(group.attrs["emdiffuse"])


def test_which_runs_need_a_ratio():
    # as prepared: the steps and spacing resolved against the model
    settings = RunSettings(samples=2, sampler="ddim", steps=2, spacing="logsnr")
    assert calibrated_ratio(None, settings) == 1.0
    assert calibrated_ratio({**RECORD, "steps": 2}, RunSettings(samples=1, sampler="ddim")) == 1.0
    assert calibrated_ratio({**RECORD, "steps": 2}, settings) == 1.0
    assert calibrated_ratio({**RECORD, "steps": 4}, settings) is None
    assert calibrated_ratio({**RECORD, "steps": 2, "sampler": "dpmpp_2m"}, settings) is None
    truncated = RunSettings(samples=2, sampler="ddim", steps=2, spacing="karras", start_noise=1.5)
    assert calibrated_ratio({**RECORD, "steps": 2}, truncated) is None


def test_spread_ratio_is_the_rms_spread_of_the_calibrated_sampling_over_the_runs():
    rng = np.random.default_rng(0)
    run = rng.normal(0.0, 0.1, (2, 5000))
    calibrated = rng.normal(0.0, 0.2, (2, 5000))
    assert spread_ratio(calibrated, run) == pytest.approx(2.0, rel=0.05)
    assert spread_ratio(calibrated, np.zeros((2, 10))) == 1.0


def test_another_samplings_half_widths_are_rescaled_by_the_measured_spread_ratio(
    random_volume, tmp_path, monkeypatch, capsys
):
    """Two checkpoints with the same weights, calibrated on ddim at 2 and at 1 step, run
    at 1 step: the one fitted there writes its half-widths as they are, measuring nothing;
    the other measures the spread ratio (ddim at 2 steps over 1 step) on its central tiles,
    records it, writes half-widths that many times wider and says so in the image's
    attributes and in the plan. A resumed run takes the recorded ratio without measuring."""
    at_two = _model(tmp_path, 2)
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    measured = []
    original = correlation.measure_pilot
    monkeypatch.setattr(correlation, "measure_pilot",
                        lambda *a, **k: measured.append(1) or original(*a, **k))  # fmt: skip
    rescaled = enhance(path, at_two, tmp_path / "rescaled.zarr", steps=1, **RUN)
    assert measured == [1]
    run = read_run_config(tmp_path / "rescaled.zarr")
    ratio = run["interval_ratio"]
    # fitted at 1 step, with the correlation that run measured: it blends alike
    at_one = _model(tmp_path, 1, rho=run["residual_correlation"])
    same = enhance(path, at_one, tmp_path / "same.zarr", steps=1, **RUN)
    assert measured == [1]  # nothing measured
    np.testing.assert_array_equal(np.asarray(same), np.asarray(rescaled))  # the same samples
    assert "interval_ratio" not in read_run_config(tmp_path / "same.zarr")
    widths_same, info_same = _uncertainty(tmp_path / "same.zarr")
    widths, info = _uncertainty(tmp_path / "rescaled.zarr")
    assert "spread_ratio" not in info_same and info["spread_ratio"] == ratio
    calibrated = (info["calibrated_sampler"], info["calibrated_steps"], info["calibrated_spacing"])
    assert calibrated == ("ddim", 2, "logsnr")
    # q · max(ratio · std, floor): the same std, above the floor the ratio times as wide
    floor = 1.5 * 1e-3 * 0.5  # q · floor · the normalisation's half range
    above = widths_same > 2 * floor * max(1.0, 1.0 / ratio)
    assert above.mean() > 0.3  # (the tiny stand-in saturates many voxels: no spread there)
    np.testing.assert_allclose(widths[above], ratio * widths_same[above], rtol=1e-4)
    # the ratio is what the two samplings' spreads are over the whole volume, about
    enhance(path, at_two, tmp_path / "two.zarr", steps=2, **RUN)  # fitted there: ratio 1
    widths_two, _ = _uncertainty(tmp_path / "two.zarr")
    volume_ratio = float(np.sqrt((widths_two**2).mean() / (widths_same**2).mean()))
    assert ratio != 1.0 and ratio == pytest.approx(volume_ratio, rel=0.3), (ratio, volume_ratio)

    # an interrupted run resumes with the ratio it recorded, and measures nothing
    def crash(index):
        if index != (0, 0, 0):
            raise Interrupt("simulated crash")

    with pytest.raises(Interrupt):
        enhance(path, at_two, tmp_path / "c.zarr", steps=1, chunks=(1, 40, 44), chunk_hook=crash,
                **RUN)  # fmt: skip
    monkeypatch.setattr(correlation, "measure_pilot", lambda *a, **k: pytest.fail("measured"))
    enhance(path, at_two, tmp_path / "c.zarr", steps=1, chunks=(1, 40, 44), resume=True, **RUN)
    np.testing.assert_array_equal(_uncertainty(tmp_path / "c.zarr")[0], widths)
    # the plan says what the uncertainty image will hold
    argv = ["enhance", str(path), str(tmp_path / "dry.zarr"), "--model", at_two, "--tile", "16",
            "--sampler", "ddim", "--steps", "1", "--samples", "2", "--threads", "--dry-run"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "uncertainty: 90 % interval half-widths, calibrated on ddim at 2 logsnr steps; this " in err


def test_half_widths_scale_with_the_ratio_above_the_floor():
    std = np.array([0.0, 1e-4, 0.1, 0.2])
    plain = half_widths(std, RECORD | {"steps": 2}, 2)
    doubled = half_widths(std, RECORD | {"steps": 2}, 2, ratio=2.0)
    np.testing.assert_allclose(doubled[2:], 2 * plain[2:], rtol=1e-6)
    assert doubled[0] == plain[0]  # the floor holds
