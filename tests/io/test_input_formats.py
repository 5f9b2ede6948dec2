"""Input formats read by their own semantics (issue 12 rows 5, 6, 7, 9, 10, 13, 18, 19).

TIFF through tifffile (every page of a page-by-page stack, ImageJ and OME axes and sizes,
RGB refused, truncated / corrupt files refused), OME-Zarr units, corrupt chunks found at
run time, and `info` that describes any readable image. Each failure is one line, exit 2,
and nothing is left behind.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from emdiffuse import io
from emdiffuse.cli import main
from emdiffuse.errors import InputError

FAST = ["--steps", "1", "--tile", "16", "--overlap", "4", "--quiet"]
STACK = (np.random.default_rng(0).random((5, 32, 40)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> str:
    """A tiny denoiser (untrained: these tests are about reading, not quality)."""
    return str(tiny_checkpoint("emdiffuse-n", high=255.0))


def _one_line_error(capsys, command: str, *words: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"emdiffuse {command}: error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback, no tifffile log lines
    assert "Traceback" not in err + captured.out
    for word in words:
        assert word in err, (word, err)
    return err


def _pages(path: Path, data: np.ndarray, **kwargs) -> Path:
    """A stack written page by page: one tifffile series per page."""
    with tifffile.TiffWriter(path) as tif:
        for plane in data:
            tif.write(plane, contiguous=False, **kwargs)
    return path


# ---- row 5: every page of a multi-page TIFF is a z-slice ------------------------------------
def test_page_by_page_stack_is_read_whole(tmp_path, capsys, model):
    path = _pages(tmp_path / "pages.tif", STACK)
    assert len(tifffile.TiffFile(path).series) == 5  # what makes it tricky
    volume = io.open_volume(path, voxel_size=8)
    assert volume.shape == (5, 32, 40) and volume.axes == "zyx"
    np.testing.assert_array_equal(volume.data.compute(), STACK)

    assert main(["info", str(path)]) == 0
    assert "(5, 32, 40)" in capsys.readouterr().out

    out = tmp_path / "c.ome.zarr"
    assert main(["convert", str(path), str(out), "--voxel-size", "8"]) == 0
    np.testing.assert_array_equal(io.open_volume(out).data.compute(), STACK)

    enhanced = tmp_path / "e.ome.zarr"
    args = ["enhance", str(path), str(enhanced), "--model", model, "--voxel-size", "8"]
    assert main([*args, *FAST, "--threads"]) == 0
    assert io.open_volume(enhanced).shape == (5, 32, 40)


def test_page_by_page_pages_of_different_shapes_are_refused(tmp_path, capsys):
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(STACK[0], contiguous=False)
        tif.write(STACK[1, :16], contiguous=False)
    out = tmp_path / "o.ome.zarr"
    assert main(["convert", str(path), str(out), "--voxel-size", "8"]) == 2
    _one_line_error(capsys, "convert", "2 images", "(32, 40)", "(16, 40)")
    assert not out.exists()


def test_imagej_and_ome_tiff_are_read_with_their_axes(tmp_path, capsys):
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, STACK[None], imagej=True, resolution=(1 / 0.008, 1 / 0.008),
                     metadata={"axes": "TZYX", "spacing": 0.03, "unit": "um"})
    volume = io.open_volume(ij)
    assert volume.shape == (5, 32, 40) and volume.voxel_size == pytest.approx((30, 8, 8))
    np.testing.assert_array_equal(volume.data.compute(), STACK)

    ome = tmp_path / "ome.tif"
    tifffile.imwrite(ome, STACK[:, None], ome=True, metadata={"axes": "ZCYX"})
    volume = io.open_volume(ome, voxel_size=8)
    assert volume.shape == (5, 32, 40) and volume.axes == "zyx"
    np.testing.assert_array_equal(volume.data.compute(), STACK)

    hyper = tmp_path / "hyper.tif"
    tifffile.imwrite(hyper, np.stack([STACK, STACK], 1), imagej=True, metadata={"axes": "ZCYX"})
    two_channels = tmp_path / "two_channels.ome.tif"
    tifffile.imwrite(two_channels, np.stack([STACK, STACK], 1), ome=True,
                     metadata={"axes": "ZCYX"})
    for path in (hyper, two_channels):
        out = tmp_path / f"{path.stem}.ome.zarr"
        assert main(["convert", str(path), str(out), "--voxel-size", "8"]) == 2
        _one_line_error(capsys, "convert", "channel", "size 2")
        assert not out.exists()


# ---- row 6 and 13: truncated, corrupt, tiny files are errors --------------------------------
def _truncated(tmp_path: Path) -> dict[str, Path]:
    files = {}
    whole = _pages(tmp_path / "pages_whole.tif", STACK)
    files["pages cut in half"] = tmp_path / "pages_half.tif"
    files["pages cut in half"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    zipped = tmp_path / "zipped_whole.tif"
    tifffile.imwrite(zipped, STACK, compression="zlib")
    files["last strip cut"] = tmp_path / "zipped_cut.tif"
    files["last strip cut"].write_bytes(zipped.read_bytes()[:-10])
    contiguous = tmp_path / "contiguous_whole.tif"
    tifffile.imwrite(contiguous, STACK)
    files["contiguous cut"] = tmp_path / "contiguous_cut.tif"
    files["contiguous cut"].write_bytes(contiguous.read_bytes()[: contiguous.stat().st_size // 2])
    for kind, options in (("imagej", {"imagej": True, "metadata": {"axes": "ZYX"}}),
                          ("ome", {"ome": True})):
        whole = tmp_path / f"{kind}_whole.tif"
        tifffile.imwrite(whole, STACK, **options)
        files[f"{kind} with fewer pages than declared"] = tmp_path / f"{kind}_cut.tif"
        files[f"{kind} with fewer pages than declared"].write_bytes(
            whole.read_bytes()[: whole.stat().st_size // 2])
    files["8 bytes"] = tmp_path / "eight.tif"
    files["8 bytes"].write_bytes(b"II*\x00\x08\x00\x00\x00")
    return files


@pytest.mark.parametrize("command", ["info", "convert", "enhance"])
def test_truncated_or_tiny_tiff_is_an_error(tmp_path, capsys, model, command):
    for name, path in _truncated(tmp_path).items():
        out = tmp_path / f"{path.stem}.ome.zarr"
        args = {
            "info": ["info", str(path)],
            "convert": ["convert", str(path), str(out), "--voxel-size", "8"],
            "enhance": ["enhance", str(path), str(out), "--model", model, "--voxel-size", "8",
                        *FAST, "--threads"],
        }[command]
        assert main(args) == 2, name
        _one_line_error(capsys, command, "truncated or corrupt")
        assert not out.exists(), name


def test_corrupt_tiff_strip_found_while_converting(tmp_path, capsys):
    path = tmp_path / "zipped.tif"
    tifffile.imwrite(path, STACK, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].pages[2]
        start, size = page.dataoffsets[0], page.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[start : start + size] = bytes(size)  # same length: only decoding can tell
    path.write_bytes(bytes(data))
    out = tmp_path / "o.ome.zarr"
    assert main(["convert", str(path), str(out), "--voxel-size", "8"]) == 2
    _one_line_error(capsys, "convert", "zipped.tif", "chunk (2, 0, 0)", "cannot be decoded")
    assert not out.exists()


# ---- row 7: colour images are refused -------------------------------------------------------
@pytest.mark.parametrize("samples", [3, 4])
def test_rgb_and_rgba_tiff_are_refused(tmp_path, capsys, model, samples):
    path = tmp_path / "colour.tif"
    rgb = np.random.default_rng(1).integers(0, 255, (32, 40, samples), dtype=np.uint8)
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e7 / 8, 1e7 / 8),
                     resolutionunit="CENTIMETER", extrasamples=["unassalpha"][: samples - 3])
    with pytest.raises(InputError, match="RGB"):
        io.open_volume(path)
    out = tmp_path / "o.ome.zarr"
    for args in (["convert", str(path), str(out)],
                 ["enhance", str(path), str(out), "--model", model, *FAST, "--threads"]):
        assert main(args) == 2
        _one_line_error(capsys, args[0], "RGB", "grey")
        assert not out.exists()


# ---- row 9: OME-Zarr without units has an unknown scale -------------------------------------
def _no_units(path: Path) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=STACK.shape, dtype=STACK.dtype, chunks=(1, 32, 40))[...] = STACK
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    return path


def test_ome_zarr_without_units_needs_voxel_size(tmp_path, capsys, model):
    path = _no_units(tmp_path / "no_units.ome.zarr")
    out = tmp_path / "o.ome.zarr"
    assert main(["enhance", str(path), str(out), "--model", model, *FAST, "--threads"]) == 2
    _one_line_error(capsys, "enhance", "unit", "--voxel-size")
    assert not out.exists()
    assert main(["convert", str(path), str(out)]) == 2
    _one_line_error(capsys, "convert", "--voxel-size")
    assert main(["info", str(path)]) == 0
    assert "unknown" in capsys.readouterr().out
    assert io.open_volume(path, voxel_size="30,8,8").voxel_size == (30.0, 8.0, 8.0)
    # our own outputs record nanometres and open as they are
    assert main(["convert", str(path), str(out), "--voxel-size", "30,8,8"]) == 0
    assert io.open_volume(out).voxel_size == (30.0, 8.0, 8.0)


# ---- row 18: info describes what it can read ------------------------------------------------
def _info(capsys, path: Path) -> str:
    assert main(["info", str(path)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_info_describes_images_of_unknown_or_foreign_scale(tmp_path, capsys):
    ome = tmp_path / "ome.tif"
    tifffile.imwrite(ome, STACK, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 8, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.008,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 0.03, "PhysicalSizeZUnit": "µm"})
    assert "(30, 8, 8) nm" in _info(capsys, ome)
    assert io.open_volume(ome).voxel_size == pytest.approx((30.0, 8.0, 8.0))

    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, STACK, resolution=(1e7 / 8, 1e7 / 8), resolutionunit="CENTIMETER")
    assert "(unknown, 8, 8) nm" in _info(capsys, cm)

    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, STACK[0], resolution=(2.54e6, 2.54e6), resolutionunit="INCH")
    assert "(10, 10) nm" in _info(capsys, inch)
    assert io.open_volume(inch).voxel_size == pytest.approx((10.0, 10.0))

    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((32, 40, 3), np.uint8), photometric="rgb")
    text = _info(capsys, rgb)
    assert "(32, 40, 3)" in text and "RGB" in text and "unknown" in text

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, STACK)
    assert "unknown" in _info(capsys, plain)


def test_print_resolution_is_not_a_voxel_size(tmp_path, capsys):
    """72/100/300 dpi are writers' defaults (the FlyEM samples say 100 dpi), not EM pixels."""
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, STACK[0], resolution=(100, 100), resolutionunit="INCH")
    with pytest.raises(InputError, match="--voxel-size"):
        io.open_volume(path)
    assert "unknown" in _info(capsys, path)


# ---- row 10: a corrupt Zarr chunk is named, nothing is left behind --------------------------
def _corrupt_zarr(tmp_path: Path) -> Path:
    path = tmp_path / "in.ome.zarr"
    io.write_image(STACK, path, voxel_size=(8, 8, 8), chunks=(1, 32, 40), levels=0)
    (path / "0" / "c" / "3" / "0" / "0").write_bytes(b"\x28\xb5\x2f\xfd not a zstd frame")
    return path


@pytest.mark.parametrize("how", ["convert", "threads", "workers"])
def test_corrupt_zarr_chunk_is_one_line(tmp_path, capfd, model, how):
    path = _corrupt_zarr(tmp_path)
    out = tmp_path / "o.ome.zarr"
    if how == "convert":
        args = ["convert", str(path), str(out)]
    else:
        scheduler = ["--threads"] if how == "threads" else ["--workers", "1"]
        args = ["enhance", str(path), str(out), "--model", model, *FAST, *scheduler,
                "--normalize", "model"]
    assert main(args) == 2
    _one_line_error(capfd, args[0], "in.ome.zarr/0", "chunk (3, 0, 0)", "c/3/0/0")
    assert not out.exists()


class _Stop(RuntimeError):
    pass


def test_corrupt_zarr_chunk_met_on_resume_keeps_the_finished_chunks(tmp_path, model):
    from emdiffuse.pipeline.enhance import enhance

    source = tmp_path / "in.ome.zarr"
    io.write_image(STACK, source, voxel_size=(8, 8, 8), chunks=(1, 32, 40), levels=0)
    out = tmp_path / "o.ome.zarr"
    kw = dict(steps=1, tile=16, overlap=4, chunks=(1, 32, 40), scheduler="threads", workers=1,
              progress=False)
    started = []

    def stop_after_two(index):
        started.append(index)
        if len(started) > 2:
            raise _Stop("simulated crash")

    with pytest.raises(_Stop):
        enhance(source, model, out, chunk_hook=stop_after_two, **kw)
    done = sorted(p.name for p in (out / ".emdiffuse" / "done").iterdir())
    todo = next(z for z in range(5) if f"{z}.0.0" not in done)
    (source / "0" / "c" / str(todo) / "0" / "0").write_bytes(b"\x28\xb5\x2f\xfd not zstd")
    with pytest.raises(InputError, match=rf"chunk \({todo}, 0, 0\).*finished chunks are kept"):
        enhance(source, model, out, resume=True, **kw)
    after = {p.name for p in (out / ".emdiffuse" / "done").iterdir()}
    assert set(done) <= after and f"{todo}.0.0" not in after  # kept, resumable


# ---- row 19: no ZarrUserWarning about our own record folder --------------------------------
def test_info_on_an_enhanced_output_warns_nothing(tmp_path, capsys, model):
    source = tmp_path / "in.ome.zarr"
    io.write_image(STACK, source, voxel_size=(8, 8, 8))
    out = tmp_path / "e.ome.zarr"
    assert main(["enhance", str(source), str(out), "--model", model, *FAST, "--threads"]) == 0
    assert (out / ".emdiffuse").is_dir()
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["info", str(out)]) == 0
    assert [str(w.message) for w in caught] == []
    assert capsys.readouterr().err == ""
