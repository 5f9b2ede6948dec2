"""The workflow scripts in workflows/ run as a user runs them: a subprocess on a LocalCluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from emdiffuse.io import open_volume, write_image
from emdiffuse.pipeline.run_record import read_run_config


@pytest.fixture(scope="module")
def workflows(repo_root) -> Path:
    """The folder of the workflow scripts (their working directory, as a user runs them)."""
    return repo_root / "workflows"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, denoise_checkpoint) -> dict[str, str]:
    root = tmp_path_factory.mktemp("workflow")
    model = denoise_checkpoint
    y, x = np.mgrid[0:32, 0:40]
    volume = np.stack([0.5 + 0.3 * np.sin(0.2 * x + 0.3 * y + z) for z in range(2)])
    image = write_image(
        da.from_array(volume.astype(np.float32), chunks=(1, 32, 40)),
        root / "noisy.ome.zarr",
        voxel_size=(30.0, 4.0, 4.0),
    )
    return {"model": str(model), "input": str(image), "root": str(root)}


def test_denoise_workflow_runs_with_the_chosen_sampler(inputs, workflows):
    out = Path(inputs["root"]) / "out.ome.zarr"
    argv = [sys.executable, str(workflows / "denoise.py"), inputs["input"], str(out),
            "--model", inputs["model"], "--workers", "1", "--steps", "2", "--tile", "16",
            "--overlap", "4", "--sampler", "dpmpp_2m_sde", "--spacing", "karras"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=workflows)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Dask dashboard:" in done.stdout and f"wrote {out}" in done.stdout
    record = read_run_config(out)
    assert (record["sampler"], record["spacing"], record["steps"]) == ("dpmpp_2m_sde", "karras", 2)
    result = open_volume(str(out))
    assert result.shape == (2, 32, 40)
    assert tuple(result.voxel_size) == pytest.approx((30.0, 4.0, 4.0))
    assert np.isfinite(np.asarray(result.data)).all()


def test_workflow_refuses_an_unknown_spacing(inputs, tmp_path, workflows):
    out = tmp_path / "never.ome.zarr"
    argv = [sys.executable, str(workflows / "denoise.py"), inputs["input"], str(out),
            "--model", inputs["model"], "--spacing", "uniform"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=workflows)
    assert done.returncode == 2 and "invalid choice: 'uniform'" in done.stderr
    assert not out.exists()
