"""The four task notebooks run top to bottom (tiny settings) with a real kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# tests/workflows/test_notebooks.py -> the checkout's workflows/ (read when tests are collected)
NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.ipynb"))


def test_there_is_one_notebook_per_task():
    assert {p.stem for p in NOTEBOOKS} == {
        "denoise",
        "super_resolution",
        "isotropic_with_isotropic_data",
        "isotropic_without_isotropic_data",
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFFUSE_SMALL", "1")
    monkeypatch.setenv("EMDIFFUSE_WORKDIR", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Dask dashboard:" in text and "PSNR" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "no picture was shown"
    assert (tmp_path / "enhanced.ome.zarr" / "uncertainty").is_dir()
