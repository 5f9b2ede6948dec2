"""OME-Zarr / TIFF I/O: round trips, pyramids, NGFF 0.4 input, URLs and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from emdiffuse import io
from emdiffuse.cli import main
from emdiffuse.errors import InputError


@pytest.fixture()
def stack(tmp_path):
    data = (np.random.default_rng(0).random((24, 80, 96)) * 60000).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.008, 1 / 0.008),
                     metadata={"axes": "ZYX", "spacing": 0.03, "unit": "um"})
    return path, data


def test_tiff_to_ome_zarr_round_trip_keeps_voxel_size(stack, tmp_path):
    path, data = stack
    volume = io.open_volume(path)
    assert volume.voxel_size == pytest.approx((30.0, 8.0, 8.0))
    out = tmp_path / "out.ome.zarr"
    assert main(["convert", str(path), str(out), "--chunks", "8,32,32"]) == 0
    back = io.open_volume(out)
    np.testing.assert_array_equal(back.data.compute(), data)
    assert back.voxel_size == pytest.approx((30.0, 8.0, 8.0))
    assert back.data.chunksize == (8, 32, 32)
    array = back.to_xarray()
    assert array.dims == ("z", "y", "x")
    assert float(array.z[1] - array.z[0]) == pytest.approx(30.0)
    assert float(array.x[3]) == pytest.approx(24.0)


def test_tiff_without_voxel_size_asks_for_it(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((4, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match="--voxel-size"):
        io.open_volume(path)
    assert io.open_volume(path, voxel_size="40,4,4").voxel_size == (40.0, 4.0, 4.0)


def test_pyramid_levels_isotropic_and_anisotropic(tmp_path):
    data = np.arange(64 * 128 * 128, dtype=np.float32).reshape(64, 128, 128)
    io.write_image(data, tmp_path / "iso.ome.zarr", voxel_size=(8, 8, 8), chunks=(32, 32, 32))
    levels = io.describe(tmp_path / "iso.ome.zarr")["levels"]
    assert [lv["shape"] for lv in levels][:3] == [(64, 128, 128), (32, 64, 64), (16, 32, 32)]
    assert levels[1]["voxel_size_nm"] == (16.0, 16.0, 16.0)
    level1 = io.open_volume(tmp_path / "iso.ome.zarr", level=1).data.compute()
    np.testing.assert_allclose(level1[0, 0, 0], data[:2, :2, :2].mean())

    io.write_image(data, tmp_path / "aniso.ome.zarr", voxel_size=(32, 8, 8), chunks=(32, 32, 32))
    levels = io.describe(tmp_path / "aniso.ome.zarr")["levels"]
    assert levels[1]["shape"] == (64, 64, 64)  # only yx halve until they reach z
    assert levels[1]["voxel_size_nm"] == (32.0, 16.0, 16.0)
    assert levels[2]["voxel_size_nm"] == (32.0, 32.0, 32.0)
    one = io.open_volume(tmp_path / "aniso.ome.zarr", level=1)
    assert one.translation == pytest.approx((0.0, 4.0, 4.0))  # mean pooling moves the centre


def test_written_metadata_validates_as_ngff_05(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image

    out = tmp_path / "v.ome.zarr"
    io.write_image(np.ones((40, 64, 64), np.uint8), out, voxel_size=(8, 8, 8), chunks=(20, 32, 32))
    image = Image.from_zarr(zarr.open_group(str(out), mode="r"))
    scales = [d.coordinateTransformations[0].scale for d in image.attributes.ome.multiscales[0].datasets]
    assert scales[0] == [8.0, 8.0, 8.0]
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes and nodes[0].data[0].shape == (40, 64, 64)


def test_ngff_04_on_zarr_v2_and_url(tmp_path):
    path = tmp_path / "old.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = np.arange(6 * 20 * 30, dtype=np.uint8).reshape(6, 20, 30)
    group.create_array("s0", shape=data.shape, dtype=data.dtype, chunks=(3, 10, 10))[...] = data
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.05, 0.01, 0.01]}]}],
    }]
    volume = io.open_volume(f"file://{path}")
    assert volume.voxel_size == pytest.approx((50.0, 10.0, 10.0))
    np.testing.assert_array_equal(volume.data.compute(), data)


def test_bad_inputs_are_refused_with_exit_2(tmp_path, stack, capsys):
    path, _ = stack
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("a", shape=(4, 4), dtype="u1")
    bare_array = tmp_path / "array.zarr"
    zarr.open_array(str(bare_array), mode="w", shape=(4, 4), dtype="u1")
    cases = {
        "does not exist": ["convert", str(tmp_path / "missing.tif"), str(tmp_path / "o1.ome.zarr")],
        "multiscales": ["convert", str(plain), str(tmp_path / "o2.ome.zarr"), "--voxel-size", "8"],
        "plain Zarr array": ["convert", str(bare_array), str(tmp_path / "o3.ome.zarr")],
        "must be positive": ["convert", str(path), str(tmp_path / "o4.ome.zarr"), "--voxel-size", "0,8,8"],
        "inside the input": ["convert", str(tmp_path / "o5.ome.zarr"), str(tmp_path / "o5.ome.zarr" / "x")],
    }
    io.write_image(np.zeros((4, 32, 32), np.uint8), tmp_path / "o5.ome.zarr", voxel_size=(8, 8, 8))
    for message, argv in cases.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
        out = argv[2]
        if not out.startswith(str(tmp_path / "o5")):
            assert not (tmp_path / out).exists()
    # existing output is not touched without --overwrite
    before = sorted(p.name for p in (tmp_path / "o5.ome.zarr").iterdir())
    assert main(["convert", str(path), str(tmp_path / "o5.ome.zarr")]) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o5.ome.zarr").iterdir()) == before


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_unsupported_dtypes(tmp_path, dtype):
    group = zarr.open_group(str(tmp_path / "x.ome.zarr"), mode="w")
    group.create_array("0", shape=(4, 8, 8), dtype=dtype)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": a} for a in "zyx"],
                          "datasets": [{"path": "0", "coordinateTransformations": [
                              {"type": "scale", "scale": [1, 1, 1]}]}]}]}
    with pytest.raises(InputError, match="dtype"):
        io.open_volume(tmp_path / "x.ome.zarr")


def test_dimensionality_checked_both_ways(tmp_path):
    io.write_image(np.zeros((32, 32), np.uint8), tmp_path / "2d.ome.zarr", voxel_size=(4, 4))
    io.write_image(np.zeros((2, 32, 32), np.uint8), tmp_path / "3d.ome.zarr", voxel_size=(4, 4, 4))
    with pytest.raises(InputError, match="2D image but a 3D volume"):
        io.open_volume(tmp_path / "2d.ome.zarr", ndim=3)
    with pytest.raises(InputError, match="3D volume but a 2D image"):
        io.open_volume(tmp_path / "3d.ome.zarr", ndim=2)


def test_nan_and_inf_are_found(tmp_path):
    data = np.zeros((8, 32, 32), np.float32)
    data[5, 3, 4] = np.nan
    io.write_image(data, tmp_path / "nan.ome.zarr", voxel_size=(8, 8, 8), chunks=(4, 16, 16))
    with pytest.raises(InputError, match="NaN or inf"):
        io.check_finite(io.open_volume(tmp_path / "nan.ome.zarr"))
    src = tmp_path / "nan.tif"
    tifffile.imwrite(src, data)
    assert main(["convert", str(src), str(tmp_path / "n.ome.zarr"), "--voxel-size", "8"]) == 2
    assert not (tmp_path / "n.ome.zarr").exists()


def test_metadata_is_written_last(tmp_path):
    out = tmp_path / "partial.ome.zarr"
    arr = io.create_image(out, shape=(4, 16, 16), dtype="u1", chunks=(2, 16, 16), voxel_size=(8, 8, 8))
    arr[:2] = 1
    with pytest.raises(InputError, match="multiscales"):
        io.open_volume(out)  # an unfinished image is never taken for a finished one
    io.finalize_image(out)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["emdiffuse"]["complete"]


def test_cli_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "emdiffuse" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "enhance" in capsys.readouterr().out
