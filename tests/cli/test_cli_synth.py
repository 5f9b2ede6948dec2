"""`emdiffuse synth`: end to end on small shapes, and each bad input (exit 2, nothing written)."""

from __future__ import annotations

import numpy as np
import pytest

from emdiffuse import io
from emdiffuse.cli import main
from emdiffuse.training.degrade import add_poisson_gaussian_noise, blur_downsample_xy, subsample_z
from emdiffuse.training.synthetic import synthetic_block

SHAPE = (16, 48, 40)


def _synth(out, task, *extra):
    return main(
        [
            "synth",
            str(out),
            "--shape",
            ",".join(map(str, SHAPE)),
            "--task",
            task,
            "--chunks",
            "8,32,32",
            "--seed",
            "2",
            *extra,
        ]
    )


def test_denoise_writes_clean_and_noisy(tmp_path, capsys):
    out = tmp_path / "den"
    assert _synth(out, "denoise", "--dose", "10", "--voxel-size", "6") == 0
    assert "clean.ome.zarr" in capsys.readouterr().out
    clean = io.open_volume(str(out / "clean.ome.zarr"))
    noisy = io.open_volume(str(out / "noisy.ome.zarr"))
    assert clean.shape == SHAPE and noisy.shape == SHAPE
    assert clean.dtype == np.uint8 and noisy.dtype == np.uint8
    np.testing.assert_allclose(clean.voxel_size, (6, 6, 6))
    np.testing.assert_allclose(noisy.voxel_size, (6, 6, 6))
    c = clean.data.compute()
    expected = np.round(synthetic_block((0, 0, 0), SHAPE, seed=2, voxel_size=6) * 255)
    assert np.abs(c.astype(float) - expected).max() <= 1
    n = noisy.data.compute()
    want = add_poisson_gaussian_noise(c / np.float32(255), dose=10, seed=2)
    want = np.clip(want, 0, 1) * 255 + 0.5
    assert np.abs(n.astype(float) - np.floor(want)).max() <= 1
    # same mean up to the clipping of bright noisy voxels at 255
    assert abs(float(n.mean()) - float(c.mean())) < 10
    assert np.std(n.astype(float) - c) > 10  # really noisy at 10 e-/voxel


def test_super_resolve_writes_lowres_with_coarser_xy(tmp_path):
    out = tmp_path / "sr"
    assert _synth(out, "super-resolve", "--factor", "4", "--dtype", "float32") == 0
    low = io.open_volume(str(out / "lowres.ome.zarr"))
    assert low.shape == (16, 12, 10) and low.dtype == np.float32
    np.testing.assert_allclose(low.voxel_size, (8, 32, 32))
    np.testing.assert_allclose(low.translation, (0, 12, 12))  # block centres, (k-1)/2 * 8 nm
    clean = io.open_volume(str(out / "clean.ome.zarr")).data.compute()
    np.testing.assert_allclose(low.data.compute(), blur_downsample_xy(clean, 4), atol=1e-5)


def test_isotropic_writes_anisotropic_with_coarser_z(tmp_path):
    out = tmp_path / "iso"
    assert _synth(out, "isotropic", "--factor", "2", "--dtype", "uint16") == 0
    aniso = io.open_volume(str(out / "anisotropic.ome.zarr"))
    assert aniso.shape == (8, 48, 40) and aniso.dtype == np.uint16
    np.testing.assert_allclose(aniso.voxel_size, (16, 8, 8))
    np.testing.assert_allclose(aniso.translation, (4, 0, 0))  # slab centres
    clean = io.open_volume(str(out / "clean.ome.zarr")).data.compute() / 65535.0
    want = subsample_z(clean.astype(np.float32), 2) * 65535 + 0.5
    assert np.abs(aniso.data.compute().astype(float) - np.floor(want)).max() <= 1


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("data")
    assert _synth(out, "denoise") == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces only what synth wrote, never a folder of the user's files
    assert _synth(out, "denoise", "--overwrite") == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    ours = tmp_path / "ours"
    assert _synth(ours, "denoise") == 0
    assert _synth(ours, "denoise") == 2
    assert _synth(ours, "denoise", "--overwrite") == 0
    assert (ours / "noisy.ome.zarr").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--shape", "16,48"],
        ["--shape", "16,a,40"],
        ["--shape", "0,48,40"],
        ["--shape", "16,-4,40"],
        ["--shape", "16,48,40", "--voxel-size", "0"],
        ["--shape", "16,48,40", "--voxel-size", "-8"],
        ["--shape", "16,48,40", "--factor", "1", "--task", "super-resolve"],
        ["--shape", "16,48,40", "--factor", "0", "--task", "isotropic"],
        ["--shape", "2,48,40", "--factor", "4", "--task", "isotropic"],
        ["--shape", "16,48,40", "--dtype", "int8"],
        ["--shape", "16,48,40", "--dose", "0"],
        ["--shape", "16,48,40", "--chunks", "8,0,32"],
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args):
    out = tmp_path / "bad"
    if "--task" not in args:
        args = [*args, "--task", "denoise"]
    assert main(["synth", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
