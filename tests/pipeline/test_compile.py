"""``enhance(..., compile=True)`` / ``--compile``: the network evaluated through
torch.compile (models/compiled.py) gives the eager run's output, with one compiled graph
per network although the run's batches are full and partial."""

from __future__ import annotations

import numpy as np
import pytest
from perturbed import perturbed_checkpoint

from emdiffuse import enhance
from emdiffuse.errors import InputError
from emdiffuse.io import write_image
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline.runtime import get_enhancer
from emdiffuse.pipeline.settings import RunSettings

# one slice per task, 2 x 2 tiles of 32 per slice, batches of 3: each task runs a full
# batch and then a batch of one
RUN = dict(steps=2, samples=1, tile=32, overlap=8, chunks=(1, 40, 40), batch_size=3,
           precision="fp32", scheduler="threads", workers=1, progress=False)  # fmt: skip


def test_compiled_run_matches_eager_with_one_graph_per_network(tmp_path):
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    model = perturbed_checkpoint(config, tmp_path / "model.safetensors", seed=3)
    path = str(tmp_path / "in.ome.zarr")
    data = np.random.default_rng(2).uniform(0.2, 0.8, (2, 40, 40)).astype(np.float32)
    write_image(data, path, voxel_size=(8.0, 8.0, 8.0))
    eager = np.asarray(enhance(path, model, tmp_path / "eager.zarr", **RUN))
    compiled = np.asarray(enhance(path, model, tmp_path / "compiled.zarr", compile=True, **RUN))
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-4)
    assert np.abs(eager - data).max() > 1e-3  # the model did change the input
    enhancer = get_enhancer(str(model), "cpu", "fp32", compile=True)  # the run's, cached
    assert enhancer.compile and not get_enhancer(str(model), "cpu", "fp32").compile
    for network in (enhancer._mean_net, enhancer._residual_net):
        assert network.shapes and {s[0] for s in network.shapes} == {3}


def test_compile_must_be_a_boolean():
    with pytest.raises(InputError, match="compile must be true or false"):
        RunSettings(compile="yes")
