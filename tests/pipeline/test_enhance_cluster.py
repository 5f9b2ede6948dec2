"""Enhancement on a real LocalCluster (2 worker processes): same output as one worker, each
lattice tile run once across the cluster, tile tasks only on GPU workers, metadata of every
task, and a worker killed mid-run has its tasks retried with a complete, identical output.

One cluster for the module (each start costs seconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster
from perturbed import perturbed_checkpoint

from emdiffuse.io import open_volume
from emdiffuse.pipeline import run_record as record
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.graph import cluster_has_gpus, cpu_count
from emdiffuse.pipeline.inprocess import run_in_process
from emdiffuse.pipeline.lattice import iter_chunks
from emdiffuse.pipeline.plan import make_plan
from emdiffuse.pipeline.prepare import prepare
from emdiffuse.pipeline.settings import RunSettings, Source

# the hook below travels to the workers by value (they cannot import this test module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = (2, 32, 40)
CHUNKS = (1, 16, 20)
RUN = dict(steps=2, tile=16, overlap=4, chunks=CHUNKS, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, denoise_checkpoint, random_volume):
    root = tmp_path_factory.mktemp("cluster")
    model = str(denoise_checkpoint)
    path = str(random_volume(SHAPE, chunks=(1, 32, 40)))
    reference = np.asarray(enhance(path, model, root / "ref.zarr", scheduler="threads", **RUN))
    return path, model, reference


def slow_chunk(index):
    time.sleep(0.4)


def test_two_workers_equal_one(client, inputs, tmp_path):
    path, model, reference = inputs
    out = enhance(path, model, tmp_path / "two.zarr", client=client, **RUN)
    assert np.abs(np.asarray(out) - reference).max() < 1e-4
    # the client's workers really ran the tasks: each loaded the model once
    loaded = client.run(
        lambda: len(__import__("emdiffuse.pipeline.runtime").pipeline.runtime._ENHANCERS)
    )
    assert sum(loaded.values()) >= 1 and max(loaded.values()) == 1


def test_a_residual_models_correlation_is_measured_on_a_worker(client, tmp_path):
    """A model without a recorded residual correlation: the run measures it on a worker of
    the cluster (where its tasks load the model; this process never loads it) before
    anything is written; the value and the output are those of a run on Dask's threads in
    this process."""
    from emdiffuse.io import write_image
    from emdiffuse.models.presets import make_config
    from emdiffuse.pipeline import runtime

    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    model = perturbed_checkpoint(config, tmp_path / "own.safetensors", seed=11)
    path = str(tmp_path / "in.ome.zarr")
    data = np.random.default_rng(5).uniform(0.2, 0.8, SHAPE).astype(np.float32)
    write_image(data, path, voxel_size=(8.0, 8.0, 8.0), chunks=(1, 32, 40))
    there = enhance(path, model, tmp_path / "there.zarr", client=client, **RUN)
    sha = record.file_sha256(model)
    assert not any(key[0] == sha for key in runtime._ENHANCERS)  # not measured here
    here = enhance(path, model, tmp_path / "here.zarr", scheduler="threads", **RUN)
    rho_here = record.read_run_config(tmp_path / "here.zarr")["residual_correlation"]
    rho_there = record.read_run_config(tmp_path / "there.zarr")["residual_correlation"]
    assert 0 < rho_there <= 1 and rho_there == pytest.approx(rho_here, abs=1e-5)
    np.testing.assert_allclose(np.asarray(there), np.asarray(here), rtol=0, atol=1e-4)


def _malloc_state():
    from emdiffuse.pipeline import runtime

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), runtime._MALLOC_TUNED[0]


def test_workers_that_load_a_model_keep_buffers_in_the_heap(client, inputs, tmp_path):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers (which makes glibc mmap every
    tensor buffer: ~2.5x slower CPU inference); a worker that loaded a model has raised the
    thresholds again. The opt-out leaves glibc alone."""
    path, model, _ = inputs
    enhance(path, model, tmp_path / "m.zarr", client=client, **RUN)
    states = client.run(_malloc_state)
    assert all(trim is not None for trim, _ in states.values())  # what the nanny sets
    loaded = client.run(
        lambda: len(__import__("emdiffuse.pipeline.runtime").pipeline.runtime._ENHANCERS)
    )
    assert any(loaded.values())
    assert all(tuned for w, (_, tuned) in states.items() if loaded[w]), states
    code = (
        "from emdiffuse.pipeline.runtime import tune_malloc; import sys; "
        "sys.exit(0 if tune_malloc() is False else 1)"
    )
    env = dict(os.environ, EMDIFFUSE_KEEP_MALLOC="1")
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_killed_worker_tasks_are_retried(client, inputs, tmp_path):
    path, model, reference = inputs
    out = tmp_path / "killed.zarr"
    pids_before = client.run(os.getpid)
    error: list[BaseException] = []

    def run():
        try:
            enhance(path, model, out, client=client, chunk_hook=slow_chunk, **RUN)
        except BaseException as exc:  # noqa: BLE001 - reported below
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    done_dir = out / ".emdiffuse" / "done"
    # no wall-clock bound: wait for a finished chunk while the run goes on
    while thread.is_alive() and not (done_dir.exists() and any(done_dir.iterdir())):
        time.sleep(0.05)
    assert done_dir.exists() and any(done_dir.iterdir()), "no chunk finished before the kill"
    victim = next(iter(pids_before.values()))
    os.kill(victim, signal.SIGKILL)
    thread.join()  # no wall-clock bound: the suite's timeout guards
    assert not error, error
    assert victim not in client.run(os.getpid).values()  # the worker really died
    n_chunks = len(list(iter_chunks(SHAPE, CHUNKS)))
    assert len(list(done_dir.iterdir())) == n_chunks
    import zarr

    result = zarr.open_array(f"{out}/0", mode="r")[...]
    assert np.abs(result - reference).max() < 1e-4


def _tiles_run() -> int:
    return __import__("emdiffuse.pipeline.runtime").pipeline.runtime.tiles_run()


def test_each_tile_runs_once_across_the_cluster(client, inputs, tmp_path):
    path, model, reference = inputs
    spec = prepare(Source(path, model), tmp_path / "unused.zarr", RunSettings(**_prepare_kw(RUN)))
    plan = make_plan(spec.lattice, spec.chunks, steps=2, samples=1, sampler="dpmpp_2m")
    assert plan.tiles_per_chunk_sum > plan.n_tiles  # tiles straddle chunk borders here
    before = client.run(_tiles_run)
    out = enhance(path, model, tmp_path / "once.zarr", client=client, **RUN)
    after = client.run(_tiles_run)
    ran = {w: after[w] - before[w] for w in after}
    assert sum(ran.values()) == spec.lattice.n_tiles, ran  # not once per chunk
    assert np.abs(np.asarray(out) - reference).max() < 1e-4
    # the in-process loop shares tiles the same way
    stats = run_in_process(spec)
    assert stats["tiles"] == spec.lattice.n_tiles and stats["chunks"] == plan.n_chunks


def _prepare_kw(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "progress"}


async def _set_gpus(count, dask_worker=None):
    await dask_worker.set_resources(GPU=count)


def test_tile_tasks_run_only_on_gpu_workers(client, inputs, tmp_path):
    path, model, reference = inputs
    workers = sorted(client.scheduler_info()["workers"])
    gpu_worker = workers[0]
    client.run(_set_gpus, 1, workers=[gpu_worker])
    try:
        assert cluster_has_gpus(client)
        before = client.run(_tiles_run)
        out = enhance(path, model, tmp_path / "gpu.zarr", client=client, **RUN)
        after = client.run(_tiles_run)
    finally:
        client.run(_set_gpus, 0, workers=[gpu_worker])
    ran = {w: after[w] - before[w] for w in after}
    spec = prepare(Source(path, model), tmp_path / "unused.zarr", RunSettings(**_prepare_kw(RUN)))
    assert ran[gpu_worker] == spec.lattice.n_tiles  # every tile ran on the GPU worker
    assert all(n == 0 for w, n in ran.items() if w != gpu_worker), ran
    assert np.abs(np.asarray(out) - reference).max() < 1e-4


def test_threaded_scheduler_does_not_oversubscribe_torch(inputs, tmp_path):
    import torch

    path, model, reference = inputs
    seen: list[int] = []
    before = torch.get_num_threads()
    out = enhance(
        path,
        model,
        tmp_path / "threads.zarr",
        **dict(RUN, scheduler="threads", workers=2),
        chunk_hook=lambda index: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {max(1, cpu_count() // 2)}  # 2 task threads share the cores
    assert torch.get_num_threads() == before  # restored after the run
    assert np.abs(np.asarray(out) - reference).max() < 1e-4


@pytest.fixture(scope="module")
def task_models(super_resolve_checkpoint, isotropic_checkpoint, random_volume):
    paths = {"emdiffuse-r": str(super_resolve_checkpoint), "vemdiffuse-i": str(isotropic_checkpoint)}
    aniso = random_volume((3, 40, 44), seed=1, voxel_size=(24.0, 8.0, 8.0), translation=(0, 80, 40))
    return paths, str(aniso)


def _levels(path) -> list:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return group.attrs["ome"]["multiscales"][0]["datasets"]


def test_metadata_of_every_task_scales_and_levels(client, inputs, task_models, tmp_path):
    """Output grid, voxel size, translation and pyramid levels for denoise,
    super-resolution x2 and isotropic x3, each run on the cluster."""
    path, model, _ = inputs
    models, aniso = task_models
    kw = dict(RUN, chunks=None)
    cases = [
        # (input, model, output shape, voxel zyx nm, translation zyx nm, level-1 shape)
        (path, model, (2, 32, 40), (8, 8, 8), (0, 0, 0), (2, 16, 20)),
        (path, models["emdiffuse-r"], (2, 64, 80), (8, 4, 4), (0, -2, -2), (2, 32, 40)),
        (aniso, models["vemdiffuse-i"], (7, 40, 44), (8, 8, 8), (0, 80, 40), (7, 20, 22)),
    ]
    for i, (inp, ckpt, shape, voxel, translation, level1) in enumerate(cases):
        out = tmp_path / f"task{i}.zarr"
        enhance(inp, ckpt, out, client=client, **kw)
        vol = open_volume(str(out))
        assert vol.shape == shape
        assert vol.voxel_size == pytest.approx(voxel)
        assert vol.translation == pytest.approx(translation)
        datasets = _levels(out)
        assert len(datasets) >= 2, datasets  # a pyramid, not level 0 only
        for level in range(len(datasets)):
            lv = open_volume(str(out), level=level)
            factors = [a / b for a, b in zip(vol.shape, lv.shape, strict=True)]
            expected = [v * round(f) for v, f in zip(voxel, factors, strict=True)]
            assert lv.voxel_size == pytest.approx(expected), (i, level)
        assert open_volume(str(out), level=1).shape == level1
        assert len(record.done_chunks(out)) == len(list(iter_chunks(shape, _chunks_of(out))))
        assert record.is_complete(out)


def _chunks_of(out) -> tuple:
    import zarr

    return zarr.open_array(f"{out}/0", mode="r").chunks
