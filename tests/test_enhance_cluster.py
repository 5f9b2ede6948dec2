"""Enhancement on a real LocalCluster (2 worker processes): same output as one worker, and a
worker killed mid-run has its tasks retried with a complete, identical output.

One cluster for the module (each start costs seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.variants import make_config
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.io import write_image
from emdiffuse.pipeline.lattice import iter_chunks

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
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0})
    model = str(root / "n.safetensors")
    save_checkpoint(model, Enhancer.from_config(config, seed=2).net.state_dict(), config)
    rng = np.random.default_rng(0)
    data = rng.uniform(0.2, 0.8, size=SHAPE).astype(np.float32)
    path = str(root / "in.ome.zarr")
    write_image(da.from_array(data, chunks=(1, 32, 40)), path, voxel_size=(8.0, 8.0, 8.0))
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
        lambda: len(__import__("emdiffuse.pipeline.workers").pipeline.workers._ENHANCERS)
    )
    assert sum(loaded.values()) >= 1 and max(loaded.values()) == 1


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
    deadline = time.time() + 60
    while time.time() < deadline and not (done_dir.exists() and any(done_dir.iterdir())):
        time.sleep(0.05)
    assert done_dir.exists(), "no chunk finished before the kill"
    victim = next(iter(pids_before.values()))
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert not error, error
    assert victim not in client.run(os.getpid).values()  # the worker really died
    n_chunks = len(list(iter_chunks(SHAPE, CHUNKS)))
    assert len(list(done_dir.iterdir())) == n_chunks
    import zarr

    result = zarr.open_array(f"{out}/0", mode="r")[...]
    assert np.abs(result - reference).max() < 1e-4
