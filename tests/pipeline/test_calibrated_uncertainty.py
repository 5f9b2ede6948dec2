"""The uncertainty image says what it holds (issue 14, part 4, on the pipeline's side).

With N >= 2 samples and a checkpoint that stores a calibration, ``uncertainty/`` holds the
per-voxel interval half-widths at the stored level (``models.calibration.half_widths`` of
the samples' standard deviation); without one, the standard deviation. The image's
``emdiffuse`` attributes say which, and ``info`` and ``view`` show it.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from emdiffuse.cli import main
from emdiffuse.errors import InputError
from emdiffuse.models.calibration import at_level, half_widths
from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline.enhance import enhance

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(tile=16, overlap=4, steps=2, sampler="ddpm", samples=3, seed=2, scheduler="threads",
           progress=False, dtype="float32")  # fmt: skip
# fitted on the runs' own sampling: their half-widths are the record's, not rescaled to
# another sampling's spread (tests/pipeline/test_interval_ratio.py)
CALIBRATION = {"level": 0.9, "scale": 1.7, "samples": 4, "floor": 1e-3, "excess": 0.2,
               "sampler": "ddpm", "steps": 2}  # fmt: skip
# a record that also stores other levels (models calibrated since INTERVAL_LEVELS)
LEVELS = {**CALIBRATION, "scales": [[0.68, 1.1], [0.9, 1.7], [0.95, 2.2]]}
LOW, HIGH = 0.0, 2.0  # the target range: a std in model space is HIGH/2 in raw units


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    config = make_config("emdiffuse-n", "tiny", normalization={"low": LOW, "high": HIGH})
    state = Enhancer.from_config(config, seed=0).net.state_dict()
    plain = save_checkpoint(root / "plain.safetensors", state, config)
    config.calibration = dict(CALIBRATION)
    config.validate()
    calibrated = save_checkpoint(root / "calibrated.safetensors", state, config)
    levels = save_checkpoint(root / "levels.safetensors", state,
                             config.replace(calibration=dict(LEVELS)))  # fmt: skip
    return {"plain": str(plain), "calibrated": str(calibrated), "levels": str(levels)}


def _uncertainty(out) -> tuple[np.ndarray, dict]:
    group = zarr.open_group(str(out / "uncertainty"), mode="r")
    return np.asarray(group["0"][...]), dict(group.attrs["emdiffuse"])


def test_calibrated_model_writes_half_widths_and_says_so(models, random_volume, tmp_path,
                                                         capsys):  # fmt: skip
    path = random_volume((2, 24, 28), chunks=(1, 24, 28))
    enhance(path, models["plain"], tmp_path / "std.zarr", **RUN)
    enhance(path, models["calibrated"], tmp_path / "cal.zarr", **RUN)
    std, std_attrs = _uncertainty(tmp_path / "std.zarr")
    widths, cal_attrs = _uncertainty(tmp_path / "cal.zarr")
    assert std_attrs["uncertainty"] == "std" and std_attrs["samples"] == 3
    assert cal_attrs["uncertainty"] == "half-width"
    assert cal_attrs["level"] == 0.9 and cal_attrs["samples"] == 3
    assert std.max() > 0
    half_range = (HIGH - LOW) / 2
    expected = half_widths(std / half_range, CALIBRATION, 3) * half_range
    np.testing.assert_allclose(widths, expected, rtol=1e-5, atol=1e-6)
    # the mean is the same image either way
    a = zarr.open_array(str(tmp_path / "std.zarr" / "0"), mode="r")[...]
    b = zarr.open_array(str(tmp_path / "cal.zarr" / "0"), mode="r")[...]
    assert np.array_equal(a, b)
    # info and view say what the map holds
    capsys.readouterr()
    assert main(["info", str(tmp_path / "cal.zarr")]) == 0
    shown = capsys.readouterr().out
    assert "uncertainty/" in shown and "90%" in shown and "half-width" in shown
    assert main(["info", str(tmp_path / "std.zarr")]) == 0
    assert "standard deviation over 3 samples" in capsys.readouterr().out
    from emdiffuse._cli.view import _child_notes

    notes = _child_notes([str(tmp_path / "cal.zarr"), str(tmp_path / "std.zarr")])
    assert any("cal.zarr/uncertainty" in n and "90%" in n for n in notes)
    assert any("std.zarr/uncertainty" in n and "standard deviation" in n for n in notes)


def test_one_sample_writes_no_uncertainty(models, random_volume, tmp_path):
    path = random_volume((2, 24, 28), chunks=(1, 24, 28))
    enhance(path, models["calibrated"], tmp_path / "one.zarr", **dict(RUN, samples=1))
    assert not (tmp_path / "one.zarr" / "uncertainty").exists()


def test_interval_level_writes_intervals_at_a_stored_level(models, random_volume, tmp_path):
    """``interval_level`` picks another level the calibration holds: the half-widths are
    those of the record at that level, the image says which, and a run resumes only at the
    level it began with (the model's own level, given or not, is the same run)."""
    path = random_volume((2, 24, 28), chunks=(1, 24, 28))
    enhance(path, models["plain"], tmp_path / "std.zarr", **RUN)
    enhance(path, models["levels"], tmp_path / "l95.zarr", interval_level=0.95, **RUN)
    enhance(path, models["levels"], tmp_path / "l90.zarr", interval_level=0.9, **RUN)
    std, _ = _uncertainty(tmp_path / "std.zarr")
    half_range = (HIGH - LOW) / 2
    for name, level in (("l95", 0.95), ("l90", 0.9)):
        widths, attrs = _uncertainty(tmp_path / f"{name}.zarr")
        assert attrs["uncertainty"] == "half-width" and attrs["level"] == level
        expected = half_widths(std / half_range, at_level(LEVELS, level), 3) * half_range
        np.testing.assert_allclose(widths, expected, rtol=1e-5, atol=1e-6)
    wide, _ = _uncertainty(tmp_path / "l95.zarr")
    narrow, _ = _uncertainty(tmp_path / "l90.zarr")
    assert (wide > narrow).all()
    enhance(path, models["levels"], tmp_path / "l90.zarr", resume=True, **RUN)  # the same run
    with pytest.raises(InputError, match="interval_level"):
        enhance(path, models["levels"], tmp_path / "l95.zarr", resume=True, **RUN)


@pytest.mark.parametrize(("model", "args", "says"), [
    ("levels", ["--interval-level", "0.97"], "holds intervals at 68 %, 90 %, 95 %, not at 97 %"),
    ("levels", ["--interval-level", "95"], "interval level must be in (0, 1)"),
    ("levels", ["--interval-level", "0.95", "--samples", "1"], "one sample has no uncertainty"),
    ("plain", ["--interval-level", "0.95"], "stores no calibration"),
])  # fmt: skip
def test_interval_level_refusals(models, random_volume, tmp_path, capsys, model, args, says):
    """A level the run cannot write is refused in one line, exit 2, before anything is made."""
    path = random_volume((2, 24, 28), chunks=(1, 24, 28))
    out = tmp_path / "out.zarr"
    code = main(["enhance", str(path), str(out), "--model", models[model], "--steps", "2",
                 "--sampler", "ddpm", "--samples", "3", "--tile", "16", "--overlap", "4",
                 "--threads", "--quiet", *args])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
