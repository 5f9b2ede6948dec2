"""The pipeline's stage timers (pipeline/stages.py) and an Enhancer injected through
``enhance(enhancer_factory=...)``, as benchmarks/pipeline_ceiling.py uses them: a real run on
real OME-Zarr stores, with a network that returns its condition."""

from __future__ import annotations

import dask.array as da
import numpy as np
import torch

from emdiffuse.io import write_image
from emdiffuse.models.checkpoints import read_checkpoint, save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config
from emdiffuse.pipeline import stages
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.lattice import iter_chunks

FACTORY_CALLS: list[str] = []


class ConditionNet(torch.nn.Module):
    """Returns the condition channel: an x0-predicting model whose every estimate is its
    input tile."""

    def forward(self, x: torch.Tensor, level: torch.Tensor, index=None) -> torch.Tensor:
        return x[:, :1]


def condition_enhancer(spec) -> Enhancer:
    FACTORY_CALLS.append(spec.checkpoint)
    config, _, _ = read_checkpoint(spec.checkpoint)
    return Enhancer(config, ConditionNet(), device="cpu", precision="fp32")


def test_injected_enhancer_and_stage_timers(tmp_path):
    config = make_config(
        "emdiffuse-n", "tiny", prediction="x0", normalization={"low": 0.0, "high": 255.0}
    )
    model = tmp_path / "x0.safetensors"
    # seed 11: a checkpoint of its own, so this process's cache of injected Enhancers is fresh
    save_checkpoint(model, Enhancer.from_config(config, seed=11).net.state_dict(), config)
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, size=(3, 40, 44), dtype=np.uint8)
    inp = write_image(
        da.from_array(volume, chunks=(1, 40, 44)), tmp_path / "in.ome.zarr", voxel_size=(8.0,) * 3
    )
    stages.reset_stages()
    FACTORY_CALLS.clear()
    chunks = (1, 16, 24)
    out = enhance(
        str(inp), str(model), tmp_path / "out.ome.zarr", steps=3, tile=16, overlap=4,
        chunks=chunks, scheduler="threads", workers=2, progress=False,
        enhancer_factory=condition_enhancer,
    )  # fmt: skip
    # the injected network returns its input: the output is the input, byte for byte
    np.testing.assert_array_equal(np.asarray(out), volume)
    assert FACTORY_CALLS == [str(model.resolve())]  # made once for the process, then cached
    record = stages.stage_seconds()
    seconds, counts = record["seconds"], record["counts"]
    n_chunks = len(list(iter_chunks((3, 40, 44), chunks)))
    assert counts["chunk_task"] == n_chunks
    assert 1 <= counts["tile_task"] <= n_chunks
    for stage in (*stages.STAGES, "prepare", "graph", "execute", "pyramid"):
        assert counts[stage] >= 1 and seconds[stage] >= 0.0, stage
    assert counts["write"] == n_chunks and 1 <= counts["read"] <= counts["tile_task"]
    inside = sum(seconds[s] for s in stages.STAGES)
    assert inside <= seconds["tile_task"] + seconds["chunk_task"]
    stages.reset_stages()
    assert stages.stage_seconds() == {"seconds": {}, "counts": {}}
