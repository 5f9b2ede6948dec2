"""Two intensity ranges in the pipeline (issue 14, part 1, on the pipeline's side): the input
is mapped into model space with the model's CONDITION range, the output back with its
TARGET range (and the spread scaled with the target's). ``normalize="auto"`` measures the
condition range on the input and carries the target range over by the same affine map.
Recorded in run.json; a record with one range (older runs) still resumes."""

from __future__ import annotations

import json
import logging

import dask.array as da
import numpy as np
import pytest

from emdiffuse.io import write_image
from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.normalization import Normalization
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.intensity import run_normalization, transfer

RUN = dict(tile=16, overlap=4, steps=1, scheduler="threads", progress=False, dtype="float32")
CONDITION = {"low": 0.0, "high": 2.0}  # a noisy input spans more ...
TARGET = {"low": 0.25, "high": 0.75}  # ... than its clean target


class Identity:
    """A stand-in for the network whose posterior mean is its condition (model space):
    the output is then exactly the input mapped in with one range and out with the other."""

    in_slices = out_slices = 1
    multiple = 1

    def posterior_mean(self, cond, noise=None):
        return np.asarray(cond, dtype=np.float32)


def _checkpoint(path, **ranges) -> str:
    config = make_config("emdiffuse-n", "tiny", **ranges)
    return str(save_checkpoint(path, Enhancer.from_config(config).net.state_dict(), config))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "two": _checkpoint(root / "two.safetensors", normalization=TARGET,
                           condition_normalization=CONDITION),  # fmt: skip
        "one": _checkpoint(root / "one.safetensors", normalization=TARGET),
    }


def test_transfer_keeps_the_models_relation():
    model_condition, model_target = Normalization(0.0, 2.0), Normalization(0.25, 0.75)
    measured = Normalization(10.0, 30.0)  # the input's percentiles: 10x the model's, +10
    target = transfer(model_condition, model_target, measured)
    assert target.low == pytest.approx(12.5) and target.high == pytest.approx(17.5)
    # one range for both: the target is exactly the measured range
    assert transfer(model_target, model_target, measured) is measured


def test_run_normalization_returns_condition_and_target(models):
    from emdiffuse.models.checkpoints import read_checkpoint

    config = read_checkpoint(models["two"])[0]
    data = da.from_array(np.linspace(10.0, 30.0, 4000).reshape(4, 10, 100), chunks=(1, 10, 100))
    condition, target = run_normalization("model", config, data, seed=0)
    assert condition == Normalization(0.0, 2.0) and target == Normalization(0.25, 0.75)
    condition, target = run_normalization("auto", config, data, seed=0)
    assert condition.low == pytest.approx(10.1, abs=0.05)
    scale = (condition.high - condition.low) / 2.0
    assert target.low == pytest.approx(condition.low + 0.25 * scale)
    assert target.high == pytest.approx(condition.low + 0.75 * scale)
    single = read_checkpoint(models["one"])[0]
    condition, target = run_normalization("auto", single, data, seed=0)
    assert condition == target


def _input(folder, values: np.ndarray) -> str:
    path = folder / "in.ome.zarr"
    write_image(values, path, voxel_size=(8.0, 8.0, 8.0))
    return str(path)


def test_input_mapped_with_condition_range_output_with_target(models, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.2, 1.8, (2, 24, 28)).astype(np.float32)
    path = _input(tmp_path, raw)
    monkeypatch.setattr(runtime, "spec_enhancer", lambda spec: Identity())
    out = np.asarray(enhance(path, models["two"], tmp_path / "o.zarr", samples=0, **RUN))
    expected = Normalization(0.25, 0.75).inverse(Normalization(0.0, 2.0).forward(raw))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    record = json.loads((tmp_path / "o.zarr" / ".emdiffuse" / "run.json").read_text())
    assert record["normalization"] == TARGET
    assert record["condition_normalization"] == CONDITION
    enhance(path, models["two"], tmp_path / "o.zarr", samples=0, resume=True, **RUN)
    # auto: the input's percentiles map it, the target range follows
    auto = np.asarray(
        enhance(path, models["two"], tmp_path / "a.zarr", samples=0, normalize="auto", **RUN)
    )
    record = json.loads((tmp_path / "a.zarr" / ".emdiffuse" / "run.json").read_text())
    condition = Normalization.of(record["condition_normalization"])
    target = Normalization.of(record["normalization"])
    assert target == transfer(Normalization(0.0, 2.0), Normalization(0.25, 0.75), condition)
    np.testing.assert_allclose(auto, target.inverse(condition.forward(raw, clip=True)), atol=1e-6)


def test_one_range_record_is_the_old_record(models, tmp_path, monkeypatch):
    """A model with one range writes the record older runs wrote (no second range), so an
    output started before the split resumes."""
    raw = np.random.default_rng(1).uniform(0.3, 0.7, (2, 24, 28)).astype(np.float32)
    path = _input(tmp_path, raw)
    monkeypatch.setattr(runtime, "spec_enhancer", lambda spec: Identity())
    out = tmp_path / "o.zarr"
    enhance(path, models["one"], out, samples=0, **RUN)
    record_path = out / ".emdiffuse" / "run.json"
    record = json.loads(record_path.read_text())
    assert "condition_normalization" not in record and record["normalization"] == TARGET
    (out / ".emdiffuse" / "complete").unlink()  # an unfinished run, as written before
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    enhance(path, models["one"], out, samples=0, resume=True, **RUN)


def test_range_warning_compares_the_input_with_the_condition_range(models, tmp_path, caplog):
    """An input in the model's condition range but far outside its target range is what
    the model was trained on: no warning. Far outside the condition range: one warning."""
    from emdiffuse.pipeline.prepare import prepare
    from emdiffuse.pipeline.settings import RunSettings, Source

    inside = _input(tmp_path, np.linspace(0.1, 1.9, 2 * 24 * 28).reshape(2, 24, 28))
    with caplog.at_level(logging.WARNING, logger="emdiffuse"):
        prepare(Source(inside, models["two"]), tmp_path / "x.zarr", RunSettings(tile=16))
    assert "training range" not in caplog.text
    far = tmp_path / "far"
    far.mkdir()
    outside = _input(far, np.linspace(50, 90, 2 * 24 * 28).reshape(2, 24, 28))
    with caplog.at_level(logging.WARNING, logger="emdiffuse"):
        prepare(Source(outside, models["two"]), tmp_path / "y.zarr", RunSettings(tile=16))
    assert "training range" in caplog.text and "0..2" in caplog.text
