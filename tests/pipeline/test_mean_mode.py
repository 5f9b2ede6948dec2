"""``samples=0``: the posterior mean only (issue 14, part 2, on the pipeline's side).

One network evaluation per tile (``Enhancer.posterior_mean``), blended linearly, no
uncertainty image; the plan counts and times it. And the mean-plus-residual kind with
samples: its mean network runs once per batch of tiles, reused by every sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from perturbed import perturbed_checkpoint

from emdiffuse.cli import main
from emdiffuse.errors import InputError
from emdiffuse.io import open_volume
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.normalization import Normalization
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.blend import window_2d
from emdiffuse.pipeline.correlation import PILOT_SAMPLES, PILOT_TILES
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.lattice import Lattice
from emdiffuse.pipeline.plan import make_plan
from emdiffuse.pipeline.tasks import tile_condition

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(tile=16, overlap=4, steps=2, scheduler="threads", progress=False, dtype="float32")
SHAPE = (2, 40, 44)


@pytest.fixture(scope="module")
def sr3_model(tmp_path_factory) -> str:
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         prediction="v")  # fmt: skip
    return perturbed_checkpoint(config, tmp_path_factory.mktemp("models") / "sr3v.safetensors")


class Calls:
    """Counts calls of an Enhancer method (and what they were given)."""

    def __init__(self, monkeypatch, name: str):
        self.calls: list[dict] = []
        original = getattr(Enhancer, name)
        calls = self.calls

        def counting(enhancer, cond, *args, **kwargs):
            calls.append({"batch": len(cond), "mean": kwargs.get("mean") is not None})
            return original(enhancer, cond, *args, **kwargs)

        monkeypatch.setattr(Enhancer, name, counting)


def _brute_force_mean(model: str, data: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """The definition of the mean mode: each lattice tile's posterior mean (clamped),
    blended linearly over the whole volume at once, in raw units."""
    enhancer = Enhancer.load(model)
    norm = Normalization(0.0, 1.0)
    lattice = Lattice(data.shape, tile, overlap)
    cond_all = np.clip(norm.forward(data), -1, 1)
    window = window_2d(tile, overlap).astype(np.float64)
    total = np.zeros(data.shape)
    weight = np.zeros(data.shape)
    full = tuple((0, n) for n in data.shape)
    for t in lattice.all_tiles():
        cond = tile_condition(lattice, t, cond_all, full)[None].astype(np.float32)
        values = np.clip(enhancer.posterior_mean(cond)[0], -1, 1)
        (z0, z1), (y0, y1), (x0, x1) = lattice.tile_output_box(t)
        w = window[: y1 - y0, : x1 - x0]
        total[z0:z1, y0:y1, x0:x1] += values[:, : y1 - y0, : x1 - x0] * w
        weight[z0:z1, y0:y1, x0:x1] += w
    return norm.inverse(total / weight)


def test_mean_mode_is_one_evaluation_per_tile_blended_linearly(
    residual_model, random_volume, tmp_path, monkeypatch
):
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    data = np.asarray(open_volume(path).data)
    means = Calls(monkeypatch, "posterior_mean")
    sampled = Calls(monkeypatch, "sample_parts")
    n_tiles = Lattice(SHAPE, 16, 4).n_tiles
    before = runtime.tiles_run()
    a = enhance(path, residual_model, tmp_path / "a.zarr", samples=0, chunks=(2, 40, 44), **RUN)
    assert runtime.tiles_run() - before == n_tiles
    assert sum(c["batch"] for c in means.calls) == n_tiles  # one evaluation per tile
    assert not sampled.calls  # nothing sampled
    b = enhance(path, residual_model, tmp_path / "b.zarr", samples=0, chunks=(1, 16, 20),
                **dict(RUN, batch_size=1))  # fmt: skip
    va, vb = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(va, vb, rtol=0, atol=1e-5)  # chunks and batches aside
    np.testing.assert_allclose(va, _brute_force_mean(residual_model, data, 16, 4), atol=1e-5)
    assert not (tmp_path / "a.zarr" / "uncertainty").exists()  # no uncertainty image
    record = json.loads((tmp_path / "a.zarr" / ".emdiffuse" / "run.json").read_text())
    assert record["samples"] == 0
    # resume compares the record: the mean-only run is a run of its own
    enhance(path, residual_model, tmp_path / "a.zarr", samples=0, chunks=(2, 40, 44),
            resume=True, **RUN)  # fmt: skip


def test_sr3_model_mean_mode_runs_its_first_x0_estimate(sr3_model, random_volume, tmp_path):
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    out = np.asarray(enhance(path, sr3_model, tmp_path / "m.zarr", samples=0, **RUN))
    assert np.isfinite(out).all() and out.std() > 0


def test_residual_kind_evaluates_its_mean_once_per_batch(
    residual_model, random_volume, tmp_path, monkeypatch
):
    """Batch outer, sample inner: the mean network runs once per batch and every sample
    reuses it; the output does not depend on the batch size. (This model records no
    residual correlation, so each run first measures it on PILOT_TILES tiles,
    PILOT_SAMPLES samples each, in the same way.)"""
    small = (1, 28, 28)
    path = random_volume(small, chunks=(1, 28, 28))
    n_tiles = Lattice(small, 16, 4).n_tiles
    means = Calls(monkeypatch, "posterior_mean")
    sampled = Calls(monkeypatch, "sample_parts")
    kw = dict(RUN, samples=3, sampler="ddpm", steps=1, chunks=(1, 28, 28))
    a = enhance(path, residual_model, tmp_path / "a.zarr", batch_size=3, **kw)
    assert sum(c["batch"] for c in sampled.calls) == 3 * n_tiles + PILOT_SAMPLES * PILOT_TILES
    first = [c for c in sampled.calls if not c["mean"]]  # the samples that ran the mean
    assert sum(c["batch"] for c in first) == n_tiles + PILOT_TILES  # once per tile
    assert not means.calls
    b = enhance(path, residual_model, tmp_path / "b.zarr", batch_size=1, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
    ua = zarr.open_array(str(tmp_path / "a.zarr" / "uncertainty" / "0"), mode="r")[...]
    ub = zarr.open_array(str(tmp_path / "b.zarr" / "uncertainty" / "0"), mode="r")[...]
    assert ua.max() > 0
    np.testing.assert_allclose(ua, ub, rtol=0, atol=1e-4)


def test_plan_counts_and_times_the_mean_mode():
    lattice = Lattice((3, 50, 70), 16, 4)
    n = lattice.n_tiles
    mean = make_plan(lattice, (1, 32, 32), steps=8, samples=0, sampler="dpmpp_2m",
                     seconds_per_evaluation=0.5)  # fmt: skip
    assert mean.evaluations == n and mean.evaluations_per_tile == 1
    assert mean.estimated_seconds == pytest.approx(0.5 * n)
    assert "posterior mean only" in mean.report()
    # a model with its own mean network: one evaluation per tile on top of the samples
    residual = make_plan(lattice, (1, 32, 32), steps=8, samples=2, sampler="dpmpp_2m",
                         shared_mean=True, seconds_per_tile=0.8)  # fmt: skip
    assert residual.evaluations == n * (8 * 2 + 1)
    assert residual.estimated_seconds == pytest.approx(0.1 * 17 * n)
    assert "the model's mean" in residual.report()


def test_cli_samples_zero_plan_and_help(residual_model, random_volume, tmp_path, capsys):
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    argv = ["enhance", str(path), str(tmp_path / "o.zarr"), "--model", residual_model,
            "--samples", "0", "--tile", "16", "--threads", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "posterior mean only" in err and "estimated time" in err
    assert not (tmp_path / "o.zarr").exists()
    argv[argv.index("0")] = "-1"
    assert main(argv) == 2
    assert "samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["enhance", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0: the posterior mean only" in text and "N >= 2" in text


def test_start_noise_runs_through_the_pipeline_and_is_part_of_the_run(
    residual_model, sr3_model, random_volume, tmp_path, capsys
):
    """``--start-noise``: the tiles start at that noise level (the same as the Enhancer's
    own truncated sample, chunking aside), the run record and plan say so, resume
    compares it, and a model without a mean refuses it before anything is written."""
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    kw = dict(RUN, sampler="dpmpp_2m", spacing="karras", steps=3)
    a = enhance(path, residual_model, tmp_path / "a.zarr", start_noise=2.0, **kw)
    b = enhance(path, residual_model, tmp_path / "b.zarr", start_noise=2.0, chunks=(1, 16, 20),
                **dict(kw, batch_size=1))  # fmt: skip
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
    full = enhance(path, residual_model, tmp_path / "full.zarr", **kw)
    assert np.abs(np.asarray(a) - np.asarray(full)).max() > 1e-3
    record = json.loads((tmp_path / "a.zarr" / ".emdiffuse" / "run.json").read_text())
    assert record["start_noise"] == 2.0 and "start_noise" not in json.loads(
        (tmp_path / "full.zarr" / ".emdiffuse" / "run.json").read_text())  # fmt: skip
    with pytest.raises(InputError, match="start_noise"):
        enhance(path, residual_model, tmp_path / "a.zarr", resume=True, start_noise=1.0, **kw)
    argv = ["enhance", str(path), str(tmp_path / "dry.zarr"), "--model", residual_model,
            "--sampler", "dpmpp_2m", "--spacing", "karras", "--steps", "4",
            "--start-noise", "2", "--dry-run", "--scheduler", "threads"]  # fmt: skip
    assert main(argv) == 0
    assert "starting at noise σ 2" in capsys.readouterr().err  # the plan goes to stderr
    out = tmp_path / "sr3.zarr"
    argv = ["enhance", str(path), str(out), "--model", sr3_model, "--spacing", "karras",
            "--start-noise", "2", "--scheduler", "threads"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "mean-plus-residual" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(InputError, match="samples 0"):
        enhance(path, residual_model, tmp_path / "m.zarr", samples=0, start_noise=2.0, **kw)


def test_start_noise_writes_the_calibrated_intervals_and_says_what_they_were_fitted_on(
    random_volume, tmp_path
):
    """A model's calibration was fitted on full samples of the default sampling; its
    intervals still cover far closer to their level with a truncated start than the plain
    spread does (benchmarks/results/interval_coverage.md), so a truncated start writes them
    too, and the image's attributes name the sampling they were fitted on."""
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    config.calibration = {"level": 0.9, "scale": 1.7, "samples": 4, "floor": 1e-3, "excess": 0.2,
                          "sampler": "dpmpp_2m", "steps": 8}  # fmt: skip
    config.validate()
    model = perturbed_checkpoint(config, tmp_path / "calibrated.safetensors")
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    kw = dict(RUN, sampler="dpmpp_2m", spacing="karras", samples=2)
    enhance(path, model, tmp_path / "full.zarr", **kw)
    enhance(path, model, tmp_path / "truncated.zarr", start_noise=2.0, **kw)

    def attributes(name: str) -> dict:
        group = zarr.open_group(str(tmp_path / name / "uncertainty"), mode="r")
        return dict(group.attrs["emdiffuse"])

    for name in ("full.zarr", "truncated.zarr"):
        info = attributes(name)
        assert info["uncertainty"] == "half-width" and info["level"] == 0.9, info
        assert (info["calibrated_sampler"], info["calibrated_steps"]) == ("dpmpp_2m", 8), info
    spread = {n: zarr.open_array(str(tmp_path / n / "uncertainty" / "0"), mode="r")[...]
              for n in ("full.zarr", "truncated.zarr")}  # fmt: skip
    assert spread["truncated.zarr"].max() > 0
    assert not np.array_equal(spread["full.zarr"], spread["truncated.zarr"])


def test_a_fitted_schedule_runs_through_the_pipeline_and_is_refused_where_there_is_none(
    residual_model, random_volume, tmp_path, capsys
):
    """``--spacing fitted`` walks the schedule stored in the model (the Enhancer's own
    sample, chunking aside), the run record says so, and a model without a schedule for
    that sampler and step count refuses it before anything is written (exit 2, one line)."""
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    config.step_schedules = {"sampler": "dpmpp_2m", "reference_steps": 32, "patches": 8,
                             "schedules": {"3": {"sigmas": [9.0, 1.0, 0.1], "rms": 0.05,
                                                 "rms_logsnr": 0.2}}}  # fmt: skip
    config.validate()
    model = perturbed_checkpoint(config, tmp_path / "fitted.safetensors")
    path = random_volume(SHAPE, chunks=(1, 24, 24))
    kw = dict(RUN, sampler="dpmpp_2m", steps=3)
    a = enhance(path, model, tmp_path / "a.zarr", spacing="fitted", **kw)
    b = enhance(path, model, tmp_path / "b.zarr", spacing="fitted", chunks=(1, 16, 20),
                **dict(kw, batch_size=1))  # fmt: skip
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
    logsnr = enhance(path, model, tmp_path / "logsnr.zarr", spacing="logsnr", **kw)
    assert np.abs(np.asarray(a) - np.asarray(logsnr)).max() > 1e-3
    record = json.loads((tmp_path / "a.zarr" / ".emdiffuse" / "run.json").read_text())
    assert record["spacing"] == "fitted"
    # by default the run walks the model's schedule, and records what it resolved to: a
    # resumed run with the defaults is the same run, one asking for logsnr is another
    default = {k: v for k, v in RUN.items() if k != "steps"}
    same = enhance(path, model, tmp_path / "default.zarr", **default)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(a))
    record = json.loads((tmp_path / "default.zarr" / ".emdiffuse" / "run.json").read_text())
    assert (record["steps"], record["spacing"]) == (3, "fitted")
    enhance(path, model, tmp_path / "default.zarr", resume=True, **default)
    with pytest.raises(InputError, match="spacing"):
        enhance(path, model, tmp_path / "default.zarr", resume=True, spacing="logsnr", **default)

    for argv_model, steps, why in ((residual_model, "3", "has none"),
                                   (model, "4", "dpmpp_2m@3, not dpmpp_2m@4")):  # fmt: skip
        out = tmp_path / f"refused-{steps}.zarr"
        argv = ["enhance", str(path), str(out), "--model", argv_model, "--steps", steps,
                "--spacing", "fitted", "--scheduler", "threads"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert not out.exists()
