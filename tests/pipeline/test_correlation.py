"""The residual correlation ρ of the texture blend: the model's calibrated value only for
the sampling it was measured at, else measured on the run's own tiles before the run
(:mod:`emdiffuse.pipeline.correlation`).

A truncated start (``start_noise``) samples residuals that correlate far less than full
samples (the demo's denoiser: 0.03 at σ 1.5 against 0.29), and other samplers or step
counts correlate more (0.42-0.46); blending them with the calibration's value left the
overlaps 11 % under-textured (benchmarks/results/tiling_start_noise.md before this change).
"""

from __future__ import annotations

import numpy as np
import pytest
from perturbed import perturbed_checkpoint

from emdiffuse.cli import main
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline import correlation
from emdiffuse.pipeline.correlation import (
    PILOT_TILES,
    calibrated_correlation,
    measure_correlation,
    pilot_tiles,
)
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.inprocess import run_in_process
from emdiffuse.pipeline.lattice import Lattice, Tile
from emdiffuse.pipeline.prepare import prepare
from emdiffuse.pipeline.run_record import read_run_config
from emdiffuse.pipeline.settings import RunSettings, Source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(tile=16, overlap=4, steps=2, scheduler="threads", progress=False, dtype="float32")
SHAPE = (2, 40, 44)
RECORD = {"level": 0.9, "scale": 1.5, "samples": 4, "floor": 1e-3}


def _prepared(schedules=None, **settings) -> RunSettings:
    """Run settings as a run prepares them for a model with these fitted schedules."""
    return RunSettings(**settings).with_sampling(schedules)


def test_the_calibrations_value_holds_only_for_the_sampling_it_measured():
    record = {**RECORD, "sampler": "dpmpp_2m", "steps": 8, "residual_correlation": 0.31}
    assert calibrated_correlation(record, _prepared()) == 0.31  # the run defaults
    assert calibrated_correlation(record, _prepared(spacing="logsnr")) == 0.31  # the same
    for other in (dict(steps=4), dict(sampler="ddim"), dict(spacing="karras"),
                  dict(spacing="karras", start_noise=1.5), dict(start_noise=2.0)):  # fmt: skip
        assert calibrated_correlation(record, _prepared(**other)) is None, other
    # a record without sampler and steps was measured at the run defaults, as training did
    # before models fitted their own schedules
    bare = {**RECORD, "residual_correlation": 0.2}
    assert calibrated_correlation(bare, _prepared()) == 0.2
    assert calibrated_correlation(bare, _prepared(steps=4)) is None
    # a model with a fitted schedule is calibrated on it, its run default
    schedules = {"sampler": "dpmpp_2m", "schedules": {"4": {}}}
    fitted = {**record, "steps": 4, "spacing": "fitted"}
    assert calibrated_correlation(fitted, _prepared(schedules)) == 0.31
    assert calibrated_correlation(fitted, _prepared(schedules, steps=4)) == 0.31
    assert calibrated_correlation(fitted, _prepared(schedules, spacing="logsnr")) is None
    assert calibrated_correlation(record, _prepared(schedules)) is None  # calibrated at 8
    # no value recorded, or no calibration: unknown
    assert calibrated_correlation(RECORD, _prepared()) is None
    assert calibrated_correlation(None, _prepared()) is None


def test_pilot_tiles_are_the_central_ones_fixed_by_the_lattice():
    lattice = Lattice((5, 200, 260), 64, 16)
    tiles = pilot_tiles(lattice)
    assert len(tiles) == PILOT_TILES and len(set(tiles)) == PILOT_TILES
    centre = np.array(lattice.output_shape) / 2
    for tile in tiles:
        box = lattice.tile_output_box(tile)
        middle = np.array([(a + b) / 2 for a, b in box])
        assert np.all(np.abs(middle - centre) <= np.array([1, 48, 48])), (tile, box)
    assert pilot_tiles(lattice) == tiles  # nothing but the lattice decides
    assert pilot_tiles(Lattice((1, 30, 30), 64, 16)) == [Tile(0, 0, 0)]  # one tile: that one


class Interrupt(RuntimeError):
    pass


def _spec(model, path, output, **settings):
    source = Source(str(path), model)
    return prepare(source, output, RunSettings(**settings), check_output=False)


def test_an_unrecorded_correlation_is_measured_once_and_recorded(
    residual_model, random_volume, tmp_path, monkeypatch, capsys
):
    """A model without a recorded correlation: the run measures it on its central tiles
    (the same value in every chunking, in process and through the pipeline), blends with
    it, records it, and a resumed run blends with the recorded value without measuring."""
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    spec = _spec(residual_model, path, tmp_path / "spec.zarr", steps=2, tile=16, overlap=4)
    assert spec.residual_correlation is None  # to be measured before the run
    rho = measure_correlation(spec)
    assert 0.0 <= rho <= 1.0
    a = enhance(path, residual_model, tmp_path / "a.zarr", chunks=(2, 40, 44), **RUN)
    assert read_run_config(tmp_path / "a.zarr").get("residual_correlation", 0.0) == rho
    b = enhance(path, residual_model, tmp_path / "b.zarr", chunks=(1, 16, 20),
                **dict(RUN, batch_size=1))  # fmt: skip
    # batches aside: a batch of 1 sums its convolutions in another order (2.5e-5 on a CPU
    # without AVX-512), as the other chunking tests allow
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
    chunks = {}
    run_in_process(spec, on_chunk=lambda index, mean: chunks.__setitem__(index, mean))
    np.testing.assert_allclose(np.asarray(a), chunks[(0, 0, 0)].astype(np.float32), atol=1e-4)

    # an interrupted run resumes with the value it recorded, and does not measure again
    def crash(index):
        if index != (0, 0, 0):
            raise Interrupt("simulated crash")

    with pytest.raises(Interrupt):
        enhance(path, residual_model, tmp_path / "c.zarr", chunks=(1, 40, 44), chunk_hook=crash,
                **dict(RUN, batch_size=1))  # fmt: skip

    def refuse(*_args, **_kw):
        raise AssertionError("a resumed run measured its correlation again")

    monkeypatch.setattr(correlation, "measure_pilot", refuse)
    plan = enhance(path, residual_model, tmp_path / "c.zarr", chunks=(1, 40, 44), resume=True,
                   dry_run=True, **dict(RUN, batch_size=1))  # fmt: skip
    assert plan.blend == f"residual correlation {rho:.3f}, the run record", plan.blend
    c = enhance(path, residual_model, tmp_path / "c.zarr", chunks=(1, 40, 44), resume=True,
                **dict(RUN, batch_size=1))  # fmt: skip
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-4)
    # the plan says so
    argv = ["enhance", str(path), str(tmp_path / "dry.zarr"), "--model", residual_model,
            "--tile", "16", "--threads", "--dry-run"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "texture blend: residual correlation measured before the run" in err, err


def test_a_calibrated_correlation_is_used_without_a_measurement(
    random_volume, tmp_path, monkeypatch, capsys
):
    """The run samples as the calibration did: its value blends, nothing is measured; the
    plan names it. A truncated start with the same model measures its own."""
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    config.calibration = {**RECORD, "sampler": "ddim", "steps": 2, "residual_correlation": 0.4}
    model = perturbed_checkpoint(config, tmp_path / "calibrated.safetensors")
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    measured = []
    original = correlation.measure_pilot
    monkeypatch.setattr(correlation, "measure_pilot",
                        lambda *a, **k: measured.append(1) or original(*a, **k))  # fmt: skip
    enhance(path, model, tmp_path / "a.zarr", sampler="ddim", **RUN)
    assert not measured
    assert read_run_config(tmp_path / "a.zarr")["residual_correlation"] == 0.4
    enhance(path, model, tmp_path / "t.zarr", sampler="ddim", spacing="karras", start_noise=1.5,
            **RUN)  # fmt: skip
    assert measured == [1]
    assert read_run_config(tmp_path / "t.zarr").get("residual_correlation", 0.0) != 0.4
    argv = ["enhance", str(path), str(tmp_path / "dry.zarr"), "--model", model, "--tile", "16",
            "--sampler", "ddim", "--steps", "2", "--threads", "--dry-run"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert "texture blend: residual correlation 0.400, the model's calibration" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("variant, factor", [("vemdiffuse-i", 3), ("emdiffuse-r", 2)])
def test_the_measurement_serves_every_task(variant, factor, random_volume, tmp_path):
    """Isotropic (a tile spans several output slices) and super-resolution (the condition
    is coarser than the output) residual models: the run measures ρ on their own tiles, and
    the output does not depend on the chunking."""
    config = make_config(variant, "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual", scale_factor=factor)  # fmt: skip
    model = perturbed_checkpoint(config, tmp_path / f"{variant}.safetensors")
    voxel = (8.0 * factor, 8.0, 8.0) if variant == "vemdiffuse-i" else (8.0, 8.0, 8.0)
    path = random_volume((3, 20, 22), chunks=(1, 20, 22), voxel_size=voxel)
    kw = dict(RUN, tile=16 if factor == 3 else 32, overlap=4, samples=1)
    a = enhance(path, model, tmp_path / "a.zarr", **kw)
    rho = read_run_config(tmp_path / "a.zarr").get("residual_correlation", 0.0)
    assert 0.0 <= rho <= 1.0
    b = enhance(path, model, tmp_path / "b.zarr", chunks=(1, 12, 14), **kw)
    assert read_run_config(tmp_path / "b.zarr").get("residual_correlation", 0.0) == rho
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
