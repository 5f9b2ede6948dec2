"""Content, not paths: a worker's caches (loaded model, opened input, opened output) never
serve a file that was replaced at the same path (issue 12, row 4).

Each test runs, replaces a file at the same path, runs again in the same process (or on the
same long-lived cluster) and compares with a run that has never seen the old file: a fresh
process, or a path the workers have never opened. Real files, real runs, no mocks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from emdiffuse.errors import InputError
from emdiffuse.io import open_volume, write_image
from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline import run_record as record
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.runtime import get_enhancer

SHAPE = (3, 32, 32)
SETTINGS = dict(steps=2, tile=16, overlap=4, chunks=(1, 16, 16), dtype="float32")
CLI_SETTINGS = (
    "--steps 2 --tile 16 --overlap 4 --chunks 1,16,16 --dtype float32 --quiet --threads --workers 2"
).split()
THREADS = dict(scheduler="threads", workers=2, progress=False)
ATOL = 1e-4  # float rounding between schedulers; a stale model or input differs by ~0.1-1


def write_model(path: Path, seed: int) -> Path:
    """A tiny denoiser with weights drawn from ``seed``, written to ``path`` (atomically).

    Every weight is perturbed: a freshly initialised network's output layer is zero, which
    would make all such models give the same output."""
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0})
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: t + 0.02 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
        for name, t in Enhancer.from_config(config, seed=seed).net.state_dict().items()
    }
    return save_checkpoint(path, state, config)


def volume(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=shape).astype(np.float32)


def read(path: Path) -> np.ndarray:
    return np.asarray(open_volume(str(path)).data)


@pytest.fixture
def fresh_process_run(source_env):
    """``fresh_process_run(input_path, model, out, *extra)``: the same run in a new Python
    process (no caches at all); its output."""

    def run(input_path: Path, model: Path, out: Path, *extra: str) -> np.ndarray:
        argv = ["enhance", str(input_path), str(out), "--model", str(model), *CLI_SETTINGS, *extra]
        done = subprocess.run(
            [sys.executable, "-m", "emdiffuse.cli", *argv], capture_output=True, text=True,
            env=source_env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return read(out)

    return run


def assert_same(got: np.ndarray, want: np.ndarray, stale: np.ndarray) -> None:
    """``got`` equals ``want`` (to float rounding) and is not the ``stale`` output."""
    if stale.shape == want.shape:  # the new content really gives another output
        assert np.abs(stale - want).max() > 100 * ATOL
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.fixture
def files(tmp_path):
    model = write_model(tmp_path / "model.safetensors", seed=1)
    data = tmp_path / "in.ome.zarr"
    write_image(volume(0), data, voxel_size=(8.0, 8.0, 8.0), chunks=(1, 32, 32))
    return tmp_path, model, data


# ---- the model ----------------------------------------------------------------------------
def test_model_replaced_at_same_path_python_api_threads(files, fresh_process_run):
    """Retrained model written over the same path, second run in the same process: the
    output is the NEW model's (as in a fresh process) and run.json records the new hash."""
    root, model, data = files
    first = root / "first.zarr"
    enhance(data, model, first, **THREADS, **SETTINGS)
    write_model(model, seed=2)  # retrained, same path
    second = root / "second.zarr"
    enhance(data, model, second, **THREADS, **SETTINGS)
    want = fresh_process_run(data, model, root / "fresh.zarr")
    assert_same(read(second), want, stale=read(first))
    assert record.read_run_config(second)["model_sha256"] == record.file_sha256(model)


def test_model_replaced_at_same_path_long_lived_cluster(files):
    """The same on a LocalCluster that outlives the runs (``client=``): its worker must not
    serve the model it loaded for the first run."""
    from distributed import Client, LocalCluster

    root, model, data = files
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        first = root / "first.zarr"
        enhance(data, model, first, client=client, progress=False, **SETTINGS)
        write_model(model, seed=2)
        second = root / "second.zarr"
        enhance(data, model, second, client=client, progress=False, **SETTINGS)
        never_seen = root / "elsewhere" / "model.safetensors"
        never_seen.parent.mkdir()
        shutil.copy(model, never_seen)
        want = root / "want.zarr"
        enhance(data, never_seen, want, client=client, progress=False, **SETTINGS)
    assert_same(read(second), read(want), stale=read(first))


def test_worker_refuses_model_that_differs_from_the_run_record(tmp_path):
    """A task asks for the run's model by the sha256 that the run recorded: it gets exactly
    that content (from the cache, even once the file is replaced), or, where that content
    was never loaded and the file now holds other bytes, a refusal, never the other model."""
    model = write_model(tmp_path / "model.safetensors", seed=11)
    recorded = record.file_sha256(model)
    enhancer = get_enhancer(str(model), "cpu", "auto", sha256=recorded)
    write_model(model, seed=12)  # replaced during the run
    assert get_enhancer(str(model), "cpu", "auto", sha256=recorded) is enhancer
    now = get_enhancer(str(model), "cpu", "auto")  # no hash: the file's content now
    assert now is not enhancer
    late = tmp_path / "late.safetensors"  # a run recorded this model, then it was replaced
    write_model(late, seed=13)
    recorded = record.file_sha256(late)
    write_model(late, seed=14)
    with pytest.raises(InputError, match="changed since the run started"):
        get_enhancer(str(late), "cpu", "auto", sha256=recorded)


# ---- the input ----------------------------------------------------------------------------
def test_tiff_replaced_at_same_path(tmp_path, fresh_process_run):
    """A TIFF stack replaced at the same path (new file, same shape): the second run reads
    the new pixels."""
    model = write_model(tmp_path / "model.safetensors", seed=1)
    tif = tmp_path / "in.tif"
    tifffile.imwrite(tif, volume(0), photometric="minisblack")
    opts = dict(voxel_size=(8.0, 8.0, 8.0), **THREADS, **SETTINGS)
    first = tmp_path / "first.zarr"
    enhance(tif, model, first, **opts)
    tifffile.imwrite(tmp_path / "new.tif", volume(5), photometric="minisblack")
    os.replace(tmp_path / "new.tif", tif)
    second = tmp_path / "second.zarr"
    enhance(tif, model, second, **opts)
    want = fresh_process_run(tif, model, tmp_path / "fresh.zarr", "--voxel-size", "8,8,8")
    assert_same(read(second), want, stale=read(first))


def test_ome_zarr_shape_changed_at_same_path(files, fresh_process_run):
    """An OME-Zarr rewritten at the same path with another shape: the second run reads the
    new array (today: ValueError from the array opened for the first run)."""
    root, model, data = files
    first = root / "first.zarr"
    enhance(data, model, first, **THREADS, **SETTINGS)
    shutil.rmtree(data)
    write_image(volume(7, (3, 48, 40)), data, voxel_size=(8.0, 8.0, 8.0), chunks=(1, 48, 40))
    second = root / "second.zarr"
    enhance(data, model, second, **THREADS, **SETTINGS)
    want = fresh_process_run(data, model, root / "fresh.zarr")
    assert_same(read(second), want, stale=read(first))


# ---- the output ---------------------------------------------------------------------------
def test_output_overwritten_with_other_chunks_at_same_path(files):
    """``overwrite`` of an output with another chunking, in the same process: the chunks are
    written with the new output's layout, not the one opened for the first run."""
    root, model, data = files
    out = root / "out.zarr"
    enhance(data, model, out, **THREADS, **SETTINGS)
    stale = read(out)
    settings = {**SETTINGS, "chunks": (1, 32, 32)}
    enhance(data, model, out, overwrite=True, **THREADS, **settings)
    want = root / "want.zarr"
    enhance(data, model, want, **THREADS, **settings)
    np.testing.assert_array_equal(read(out), read(want))
    np.testing.assert_allclose(read(out), stale, rtol=0, atol=ATOL)  # chunking-invariant
