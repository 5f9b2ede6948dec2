"""The demo end to end with tiny settings, and reuse of its cached model."""

from __future__ import annotations

import json

import pytest

from emdiffuse import io
from emdiffuse.cli import main
from emdiffuse.demo import run_demo


@pytest.mark.slow
def test_demo_end_to_end_and_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    report = run_demo(tmp_path / "demo", shape=(2, 64, 64), minutes=0.15, steps=2, samples=2,
                      cache=cache, scheduler="threads", progress=False)
    for name in ("clean", "noisy", "enhanced"):
        volume = io.open_volume(tmp_path / "demo" / f"{name}.ome.zarr")
        assert volume.shape == (2, 64, 64) and volume.voxel_size == (8.0, 8.0, 8.0)
    assert io.open_volume(tmp_path / "demo" / "enhanced.ome.zarr" / "uncertainty").shape == (2, 64, 64)
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    assert set(report) >= {"psnr_noisy", "psnr_enhanced", "ssim_noisy", "ssim_enhanced", "gain_db"}
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["model_reused"] is False
    assert "emdiffuse view" in capsys.readouterr().out

    again = run_demo(tmp_path / "demo", shape=(2, 64, 64), minutes=0.15, steps=2, samples=1,
                     cache=cache, scheduler="threads", progress=False, overwrite=True)
    assert again["model_reused"] is True
    assert "reusing model" in capsys.readouterr().out


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "not an earlier demo folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
