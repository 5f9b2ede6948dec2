"""Chunked enhancement end to end on real OME-Zarr stores with tiny random-init models.

Runs on Dask's threaded scheduler (the LocalCluster tests are in test_enhance_cluster.py).
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from emdiffuse.errors import InputError
from emdiffuse.io import open_volume, write_image
from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.inprocess import run_in_process
from emdiffuse.pipeline.lattice import chunk_box, iter_chunks
from emdiffuse.pipeline.plan import Plan
from emdiffuse.pipeline.prepare import prepare
from emdiffuse.pipeline.run_record import read_run_config
from emdiffuse.pipeline.runtime import get_enhancer
from emdiffuse.pipeline.settings import RunSettings, Source

RUN = dict(steps=2, tile=16, overlap=4, scheduler="threads", progress=False)


def _smooth_volume(shape, seed=0) -> np.ndarray:
    """Smooth EM-like intensities in [0.1, 0.9] (sum of low-frequency waves)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    vol = np.zeros(shape)
    for _ in range(6):
        freq = rng.uniform(0.02, 0.12, size=len(shape))
        phase = rng.uniform(0, 2 * np.pi)
        vol += np.sin(sum(f * g for f, g in zip(freq, grids, strict=True)) + phase)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    return (0.1 + 0.8 * vol).astype(np.float32)


def _cond_only_checkpoint(path: Path) -> str:
    """A denoiser whose output depends on the conditioning only: x0-prediction with the
    first convolution's weights on the noisy channel zeroed. Its output is a smooth-ish
    deterministic function of the input in which neighbouring tiles disagree (the network
    normalises over the tile), the case blending has to hide."""
    import torch

    config = make_config(
        "emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0}, prediction="x0"
    )
    state = Enhancer.from_config(config, seed=3).net.state_dict()
    first = next(
        name for name, t in state.items() if t.ndim == 4 and t.shape[1] == config.unet.in_channels
    )
    state = dict(state)
    state[first] = state[first].clone()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        state[first][:, config.in_slices :] = 0.0
        for name, t in state.items():  # zero-initialised layers (the output conv) get weights
            if t.is_floating_point() and t.ndim == 4 and not t.any():
                state[name] = 0.1 * torch.randn(t.shape, generator=generator)
    save_checkpoint(path, state, config)
    return str(path)


@pytest.fixture(scope="module")
def models(
    tmp_path_factory, denoise_checkpoint, super_resolve_checkpoint, isotropic_checkpoint
) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "smooth": _cond_only_checkpoint(root / "smooth.safetensors"),
        "n": str(denoise_checkpoint),
        "r": str(super_resolve_checkpoint),
        "i": str(isotropic_checkpoint),
    }


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {}
    data = _smooth_volume((3, 40, 44))
    paths["3d"] = str(root / "vol.ome.zarr")
    write_image(da.from_array(data, chunks=(1, 24, 24)), paths["3d"], voxel_size=(8.0, 8.0, 8.0))
    iso = _smooth_volume((4, 24, 28), seed=1)
    paths["aniso"] = str(root / "aniso.ome.zarr")
    write_image(da.from_array(iso, chunks=(2, 24, 28)), paths["aniso"], voxel_size=(24.0, 8.0, 8.0))
    paths["2d"] = str(root / "slice.ome.zarr")
    write_image(
        da.from_array(data[0], chunks=(24, 24)), paths["2d"], voxel_size=(8.0, 8.0), axes="yx"
    )
    u8 = (data * 255).astype(np.uint8)
    paths["u8"] = str(root / "u8.ome.zarr")
    write_image(da.from_array(u8, chunks=(1, 40, 44)), paths["u8"], voxel_size=(8.0, 8.0, 8.0))
    return paths


def _level0(path) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/0", mode="r")[...])


def test_chunking_invariance_deterministic(models, volumes, tmp_path):
    a = enhance(
        volumes["3d"], models["n"], tmp_path / "a.zarr", chunks=(3, 40, 44), dtype="float32", **RUN
    )
    b = enhance(
        volumes["3d"], models["n"], tmp_path / "b.zarr", chunks=(1, 12, 20), dtype="float32", **RUN
    )
    va, vb = np.asarray(a), np.asarray(b)
    assert va.shape == (3, 40, 44) and va.dtype == np.float32
    assert np.isfinite(va).all()
    assert np.abs(va - vb).max() < 1e-4
    assert va.std() > 0  # not a constant output


def test_chunking_invariance_stochastic_with_uncertainty(models, volumes, tmp_path):
    kw = dict(RUN, sampler="ddpm", steps=3, samples=2, seed=5, dtype="float32")
    a = enhance(volumes["3d"], models["n"], tmp_path / "a.zarr", chunks=(2, 40, 24), **kw)
    b = enhance(volumes["3d"], models["n"], tmp_path / "b.zarr", chunks=(1, 16, 44), **kw)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4
    ua = _level0(tmp_path / "a.zarr" / "uncertainty")
    ub = _level0(tmp_path / "b.zarr" / "uncertainty")
    assert ua.shape == (3, 40, 44) and ua.dtype == np.float32
    assert (ua >= 0).all() and ua.max() > 0
    assert np.abs(ua - ub).max() < 1e-4
    # another seed gives another result (the noise really depends on the seed)
    c = enhance(
        volumes["3d"], models["n"], tmp_path / "c.zarr", chunks=(3, 40, 44), **dict(kw, seed=6)
    )
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def _border_ratio(vol: np.ndarray, chunk: int, axis: int) -> float:
    """Mean squared gradient across chunk borders along ``axis`` / mean over all positions."""
    grad = np.diff(vol.astype(np.float64), axis=axis) ** 2
    energy = grad.mean(axis=tuple(a for a in range(vol.ndim) if a != axis))
    borders = np.arange(chunk - 1, vol.shape[axis] - 1, chunk)
    return float(energy[borders].mean() / energy.mean())


SMOOTH = dict(RUN, sampler="ddim", tile=16, overlap=8, dtype="float32")


def test_no_seams_at_chunk_borders(models, volumes, tmp_path):
    from dataclasses import replace

    from emdiffuse.pipeline.inprocess import compute_chunk
    from emdiffuse.pipeline.lattice import Lattice

    chunks = (1, 12, 16)
    inp, model = volumes["3d"], models["smooth"]
    whole = np.asarray(enhance(inp, model, tmp_path / "w.zarr", chunks=(3, 40, 44), **SMOOTH))
    chunked = np.asarray(enhance(inp, model, tmp_path / "c.zarr", chunks=chunks, **SMOOTH))
    # the chunked output is the one-chunk output: chunk borders leave no trace
    assert np.abs(whole - chunked).max() < 1e-4
    ours = max(_border_ratio(chunked, chunks[1], 1), _border_ratio(chunked, chunks[2], 2))
    assert ours < 1.5
    # the statistic does see a seam: enhance each chunk as a volume of its own
    spec = prepare(
        Source(inp, model), tmp_path / "x.zarr", RunSettings(steps=2, tile=16, overlap=8)
    )
    spec = replace(spec, settings=replace(spec.settings, sampler="ddim"))
    enhancer = get_enhancer(model, "cpu")
    raw = np.asarray(open_volume(inp).data)
    naive = np.empty_like(whole)
    for index in iter_chunks(whole.shape, chunks):
        sl = tuple(slice(a, b) for a, b in chunk_box(index, whole.shape, chunks))
        piece = raw[sl]
        local = replace(
            spec,
            lattice=Lattice(piece.shape, 16, 8),
            settings=replace(spec.settings, chunks=piece.shape),
        )
        read = tuple((0, n) for n in piece.shape)
        naive[sl] = compute_chunk(local, (0, 0, 0), enhancer, piece, read)[0]
    naive_ratio = max(_border_ratio(naive, chunks[1], 1), _border_ratio(naive, chunks[2], 2))
    assert naive_ratio > 1.5 * ours


def _tile_edge_ratio(vol: np.ndarray, origins: np.ndarray, tile: int, axis: int) -> float:
    grad = np.diff(vol.astype(np.float64), axis=axis) ** 2
    energy = grad.mean(axis=tuple(a for a in range(vol.ndim) if a != axis))
    edges = sorted({int(o) - 1 for o in origins[1:]} | {int(o) + tile - 1 for o in origins[:-1]})
    edges = [e for e in edges if 0 <= e < len(energy)]
    return float(energy[edges].mean() / energy.mean())


def test_blending_hides_tile_borders(models, volumes, tmp_path):
    from emdiffuse.pipeline.lattice import AxisTiling

    inp, model = volumes["3d"], models["smooth"]
    blended = np.asarray(enhance(inp, model, tmp_path / "b.zarr", **SMOOTH))
    hard = np.asarray(enhance(inp, model, tmp_path / "h.zarr", **dict(SMOOTH, overlap=0)))
    ratios = {}
    for name, vol, overlap in (("blended", blended, 8), ("hard", hard, 0)):
        ratios[name] = max(
            _tile_edge_ratio(vol, AxisTiling(n, 16, overlap).origins, 16, axis)
            for axis, n in ((1, 40), (2, 44))
        )
    assert ratios["blended"] < 1.5, ratios
    assert ratios["hard"] > ratios["blended"], ratios


class Interrupt(RuntimeError):
    pass


def crash_after(n: int):
    """A ``chunk_hook`` that raises :class:`Interrupt` when chunk ``n + 1`` starts: a crash
    with ``n`` chunks started."""
    started = []

    def hook(index):
        started.append(index)
        if len(started) > n:
            raise Interrupt("simulated crash")

    return hook


def test_resume_after_interrupt_gives_same_bytes(models, volumes, tmp_path, capsys):
    kw = dict(RUN, chunks=(1, 16, 24), dtype="float32", workers=1)
    ref = tmp_path / "ref.zarr"
    enhance(volumes["3d"], models["n"], ref, **kw)
    out = tmp_path / "out.zarr"
    with pytest.raises(Interrupt):
        enhance(volumes["3d"], models["n"], out, chunk_hook=crash_after(4), **kw)
    n_chunks = len(list(iter_chunks((3, 40, 44), (1, 16, 24))))
    done = list((out / ".emdiffuse" / "done").iterdir())
    assert 1 <= len(done) < n_chunks
    # an interrupted output is refused without --resume
    with pytest.raises(InputError):
        enhance(volumes["3d"], models["n"], out, **kw)
    resumed = []
    enhance(volumes["3d"], models["n"], out, resume=True, chunk_hook=resumed.append, **kw)
    assert len(resumed) == n_chunks - len(done)  # finished chunks are skipped
    for level in ("0", "1"):
        if not (ref / level).exists():
            continue
        np.testing.assert_array_equal(
            zarr.open_array(f"{ref}/{level}")[...], zarr.open_array(f"{out}/{level}")[...]
        )
    ref_files = sorted(p.relative_to(ref) for p in (ref / "0").rglob("*") if p.is_file())
    out_files = sorted(p.relative_to(out) for p in (out / "0").rglob("*") if p.is_file())
    assert ref_files == out_files
    for rel in ref_files:
        assert (ref / rel).read_bytes() == (out / rel).read_bytes()
    # a finished run is not redone
    capsys.readouterr()
    again = []
    enhance(
        volumes["3d"],
        models["n"],
        out,
        resume=True,
        chunk_hook=again.append,
        **dict(kw, progress=True),
    )
    assert again == []
    assert "already complete" in capsys.readouterr().err


def test_chunks_per_task_writes_the_same_output_in_fewer_tasks(models, volumes, tmp_path):
    """Several output chunks per task (fewer, larger tasks) write the output of one chunk
    per task, with the store's chunking unchanged and every chunk marked done."""
    kw = dict(RUN, chunks=(1, 16, 24), dtype="float32")
    ref = np.asarray(enhance(volumes["3d"], models["n"], tmp_path / "ref.zarr", **kw))
    grid = (3, 3, 2)  # output chunks of (3, 40, 44) by (1, 16, 24)
    for per_task, tasks in (((1, 2, 2), 3 * 2 * 1), (2, 2 * 2 * 1)):
        out = tmp_path / f"o{tasks}.zarr"
        started = []
        result = enhance(
            volumes["3d"], models["n"], out, chunks_per_task=per_task,
            chunk_hook=started.append, **kw,
        )  # fmt: skip
        assert len(started) == tasks  # one chunk task per task region
        assert zarr.open_array(f"{out}/0").chunks == (1, 16, 24)
        assert np.abs(np.asarray(result) - ref).max() < 1e-4
        done = {p.name for p in (out / ".emdiffuse" / "done").iterdir()}
        assert len(done) == int(np.prod(grid))
        # a scheduling choice, as the batch size: not part of the run record
        assert read_run_config(out) == read_run_config(tmp_path / "ref.zarr")
    with pytest.raises(InputError, match="chunks per task"):
        enhance(volumes["3d"], models["n"], tmp_path / "bad.zarr", chunks_per_task=(2, 2), **kw)
    with pytest.raises(InputError, match="chunks per task"):
        enhance(volumes["3d"], models["n"], tmp_path / "bad.zarr", chunks_per_task=0, **kw)


def test_resume_with_chunks_per_task_gives_same_bytes(models, volumes, tmp_path):
    """An interrupted run with several chunks per task resumes to the bytes of an
    uninterrupted one; it may resume with another grouping (the record leaves it out)."""
    kw = dict(RUN, chunks=(1, 16, 24), dtype="float32", workers=1, chunks_per_task=(1, 2, 2))
    ref = tmp_path / "ref.zarr"
    enhance(volumes["3d"], models["n"], ref, **kw)
    out = tmp_path / "out.zarr"
    with pytest.raises(Interrupt):
        enhance(volumes["3d"], models["n"], out, chunk_hook=crash_after(2), **kw)
    done = len(list((out / ".emdiffuse" / "done").iterdir()))
    assert done % 2 == 0 and 2 <= done < 18  # whole tasks: 2 or 4 chunks each
    enhance(volumes["3d"], models["n"], out, resume=True, **kw)
    for level in ("0", "1"):
        if (ref / level).exists():
            np.testing.assert_array_equal(
                zarr.open_array(f"{ref}/{level}")[...], zarr.open_array(f"{out}/{level}")[...]
            )
    other = tmp_path / "other.zarr"
    with pytest.raises(Interrupt):
        enhance(volumes["3d"], models["n"], other, chunk_hook=crash_after(2), **kw)
    enhance(volumes["3d"], models["n"], other, resume=True, **dict(kw, chunks_per_task=1))
    assert np.abs(_level0(other) - _level0(ref)).max() < 1e-4


def test_resume_refuses_other_settings(models, volumes, tmp_path):
    out = tmp_path / "o.zarr"
    enhance(volumes["3d"], models["n"], out, **RUN)
    with pytest.raises(InputError, match="steps"):
        enhance(volumes["3d"], models["n"], out, resume=True, **dict(RUN, steps=3))
    # the spacing is part of the run: the default (logsnr for dpmpp_2m) is recorded by name
    assert read_run_config(out)["spacing"] == "logsnr"
    # and the schedule the sampler walks (this model's training schedule: it stores no other)
    assert read_run_config(out)["sampling_schedule"]["steps"] == 2000
    with pytest.raises(InputError, match="spacing: 'logsnr' -> 'karras'"):
        enhance(volumes["3d"], models["n"], out, resume=True, spacing="karras", **RUN)
    enhance(volumes["3d"], models["n"], out, resume=True, spacing="logsnr", **RUN)  # same run


def test_metadata_denoise_same_grid(models, volumes, tmp_path):
    out = enhance(volumes["u8"], models["n"], tmp_path / "n.zarr", **RUN)
    assert out.dtype == np.uint8  # the input's dtype by default
    vol = open_volume(str(tmp_path / "n.zarr"))
    assert vol.shape == (3, 40, 44)
    assert tuple(vol.voxel_size) == pytest.approx((8.0, 8.0, 8.0))
    level1 = open_volume(str(tmp_path / "n.zarr"), level=1)
    assert level1.shape[1:] == (20, 22)
    assert tuple(level1.voxel_size)[1:] == pytest.approx((16.0, 16.0))


def test_metadata_super_resolution(models, volumes, tmp_path):
    out = enhance(volumes["3d"], models["r"], tmp_path / "r.zarr", **dict(RUN, tile=16, overlap=4))
    vol = open_volume(str(tmp_path / "r.zarr"))
    assert vol.shape == (3, 80, 88)
    assert tuple(vol.voxel_size) == pytest.approx((8.0, 4.0, 4.0))
    assert out.shape == (3, 80, 88)
    assert np.isfinite(np.asarray(out)).all()


def test_metadata_isotropic_keeps_original_slices(models, volumes, tmp_path):
    out = enhance(
        volumes["aniso"], models["i"], tmp_path / "i.zarr", **dict(RUN, tile=12, overlap=4)
    )
    vol = open_volume(str(tmp_path / "i.zarr"))
    assert vol.shape == ((4 - 1) * 3 + 1, 24, 28)
    assert tuple(vol.voxel_size) == pytest.approx((8.0, 8.0, 8.0))
    raw = np.asarray(open_volume(volumes["aniso"]).data)
    values = np.asarray(out)
    np.testing.assert_array_equal(values[::3], raw)  # input slice i is output slice 3i
    assert not np.allclose(values[1], values[0])  # the model filled the slices between


def test_two_d_input_and_small_volume_padding(models, volumes, tmp_path):
    out = enhance(volumes["2d"], models["n"], tmp_path / "s.zarr", **dict(RUN, tile=64, overlap=8))
    assert out.dims == ("y", "x") and out.shape == (40, 44)  # one tile, padded by reflection
    assert np.isfinite(np.asarray(out)).all()


def test_in_process_loop_matches_pipeline(models, volumes, tmp_path):
    out = np.asarray(
        enhance(
            volumes["3d"],
            models["n"],
            tmp_path / "p.zarr",
            chunks=(1, 20, 44),
            dtype="float32",
            **RUN,
        )
    )
    spec = prepare(
        Source(volumes["3d"], models["n"]),
        tmp_path / "q.zarr",
        RunSettings(steps=2, tile=16, overlap=4, chunks=(1, 20, 44), dtype="float32"),
    )
    result = np.empty_like(out)

    def keep(index, mean):
        result[tuple(slice(a, b) for a, b in chunk_box(index, out.shape, spec.chunks))] = mean

    stats = run_in_process(spec, on_chunk=keep)
    assert stats["chunks"] == 6 and stats["tiles"] > 0
    assert np.abs(result - out).max() < 1e-4


def test_dry_run_writes_nothing(models, volumes, tmp_path, capsys):
    plan = enhance(
        volumes["3d"], models["n"], tmp_path / "d.zarr", dry_run=True, **dict(RUN, progress=False)
    )
    assert isinstance(plan, Plan)
    assert plan.n_chunks >= 1 and plan.evaluations == plan.tiles_computed * 2
    assert plan.estimated_seconds is not None and plan.estimated_seconds > 0
    assert not (tmp_path / "d.zarr").exists()
    assert "network evaluations" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, match",
    [
        ("iso_on_2d", "2D"),
        ("exists", "exist"),
        ("inside_input", "inside"),
        ("nan", "NaN"),
        ("bad_tile", "multiple"),
        ("bad_steps", "steps"),
        ("aniso_mismatch", "z step"),
        ("iso_one_slice", "at least 2 z-slices"),
    ],
)
def test_bad_inputs_raise_before_writing(models, volumes, tmp_path, case, match):
    out = tmp_path / "bad.zarr"
    kw = dict(RUN)
    inp, model = volumes["3d"], models["n"]
    if case == "iso_on_2d":
        inp, model = volumes["2d"], models["i"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "inside_input":
        out = Path(volumes["3d"]) / "inner.zarr"
    elif case == "nan":
        data = _smooth_volume((2, 16, 16))
        data[1, 3, 3] = np.nan
        inp = str(tmp_path / "nan.zarr")
        write_image(da.from_array(data), inp, voxel_size=(8.0, 8.0, 8.0))
    elif case == "bad_tile":
        kw["tile"] = 18
    elif case == "bad_steps":
        kw["steps"] = 0
    elif case == "iso_one_slice":
        model = models["i"]
        inp = str(tmp_path / "one.zarr")
        write_image(da.from_array(_smooth_volume((1, 16, 16))), inp, voxel_size=(24.0, 8.0, 8.0))
    elif case == "aniso_mismatch":
        model = models["i"]  # x3 in z, but the volume is isotropic
    before = {path: _files(path) for path in (inp, model)}
    with pytest.raises(InputError, match=match):
        enhance(inp, model, out, **kw)
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert {path: _files(path) for path in (inp, model)} == before  # input and model untouched


def _files(path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself): relative name -> bytes."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_auto_normalization_is_global_and_recorded(models, volumes, tmp_path):
    import json

    kw = dict(RUN, normalize="auto", dtype="float32")
    a = enhance(volumes["u8"], models["n"], tmp_path / "a.zarr", chunks=(3, 40, 44), **kw)
    b = enhance(volumes["u8"], models["n"], tmp_path / "b.zarr", chunks=(1, 20, 12), **kw)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-3  # raw units here (0..255)
    stored = json.loads((tmp_path / "a.zarr" / ".emdiffuse" / "run.json").read_text())
    raw = np.asarray(open_volume(volumes["u8"]).data)
    low, high = np.percentile(raw, (0.5, 99.5))
    assert stored["normalization"]["low"] == pytest.approx(low, abs=2)
    assert stored["normalization"]["high"] == pytest.approx(high, abs=2)


def test_batch_log_gets_plain_progress_lines(models, volumes, tmp_path, capsys):
    """stderr that is not a terminal (a SLURM log, a captured cell) gets a few plain lines —
    chunks done, Mvoxel/s, ETA — instead of a live bar's frames."""
    kw = dict(RUN, chunks=(1, 8, 8), dtype="float32", progress=True)
    enhance(volumes["3d"], models["n"], tmp_path / "p.zarr", **kw)
    err = capsys.readouterr().err
    n_chunks = len(list(iter_chunks((3, 40, 44), (1, 8, 8))))
    lines = [line for line in err.splitlines() if line.startswith("chunks ")]
    assert n_chunks >= 60 and "\r" not in err
    assert 1 <= len(lines) <= 22  # every 5 % at most, and the last
    assert lines[-1].startswith(f"chunks {n_chunks}/{n_chunks} (100 %)")
    assert "Mvoxel/s" in lines[-1] and "elapsed" in lines[-1]


def test_line_progress_spacing_and_eta():
    from emdiffuse.pipeline.progress import LineProgress

    class Stream(list):
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    now = [0.0]
    stream = Stream()
    bar = LineProgress(200, voxels=200 * 10**6, stream=stream, every_seconds=60.0,
                       clock=lambda: now[0])  # fmt: skip
    for _ in range(100):  # 1 chunk a second: a line every 10 chunks (5 %)
        now[0] += 1.0
        bar.update()
    assert bar.lines == 10
    assert "chunks 100/200 (50 %)" in bar.line(now[0]) and "ETA 1 min 40 s" in bar.line(now[0])
    assert "1 Mvoxel/s" in bar.line(now[0])
    now[0] += 600.0  # a long chunk: the time rule prints although only one chunk finished
    bar.update()
    assert bar.lines == 11


class _BatchRecorder(Enhancer):
    """The checkpoint's Enhancer, noting the size of every batch it is given."""

    seen: list[int] = []

    def posterior_mean(self, cond, noise=None):
        _BatchRecorder.seen.append(int(cond.shape[0]))
        return super().posterior_mean(cond, noise)


def _recorder(spec):
    return _BatchRecorder.load(spec.checkpoint, device="cpu")


def test_default_tile_batch_follows_the_device(denoise_checkpoint, tmp_path):
    """``batch_size`` None (the default) is 16 tiles per network call on a GPU and 4 on a
    CPU (settings.tile_batch); a run on the CPU without it calls the network with 4."""
    from emdiffuse.pipeline.settings import tile_batch

    assert RunSettings().batch_size is None
    assert (tile_batch(None, "cuda"), tile_batch(None, "cpu"), tile_batch(7, "cuda")) == (16, 4, 7)
    path = str(tmp_path / "in.ome.zarr")
    write_image(_smooth_volume((1, 64, 64)), path, voxel_size=(8.0, 8.0, 8.0))
    for batch_size, largest in ((None, 4), (7, 7)):
        _BatchRecorder.seen.clear()
        enhance(path, denoise_checkpoint, tmp_path / f"out{batch_size}.zarr", samples=0,
                tile=16, overlap=4, chunks=(1, 64, 64), batch_size=batch_size,
                scheduler="threads", workers=1, progress=False, enhancer_factory=_recorder)  # fmt: skip
        assert max(_BatchRecorder.seen) == largest and sum(_BatchRecorder.seen) > largest
