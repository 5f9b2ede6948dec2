"""Registration of raw pairs: known shift and known smooth warp recovered, report, CLI, bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from emdiffuse import io
from emdiffuse.cli import main
from emdiffuse.errors import InputError
from emdiffuse.training.degrade import add_poisson_gaussian_noise
from emdiffuse.training.registration import RegistrationReport, ncc, register_pair, warp_image
from emdiffuse.training.synthetic import synthetic_block

N = 128
PAD = 16


def _texture(seed: int = 3, n_z: int = 1) -> np.ndarray:
    """A synthetic EM block with a PAD margin around the N x N field of view."""
    return synthetic_block((0, 0, 0), (n_z, N + 2 * PAD, N + 2 * PAD), seed=seed)


def _crop(image: np.ndarray) -> np.ndarray:
    return image[..., PAD : PAD + N, PAD : PAD + N]


def _sinusoid(amplitude: float = 2.0) -> np.ndarray:
    """A smooth displacement field (2, N, N) with peak length ~ amplitude voxels."""
    rr, cc = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    dy = amplitude * np.sin(2 * np.pi * rr / 128 + 0.5) * np.cos(2 * np.pi * cc / 128)
    dx = amplitude * np.cos(2 * np.pi * cc / 128 + 0.3) * np.sin(2 * np.pi * rr / 160 + 1.0)
    return np.stack([dy, dx])


def _warped(big: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """moving[r] = big[r + PAD + disp(r)]: fixed = big cropped is moving warped by -disp."""
    rr, cc = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    coords = [rr + PAD + disp[0], cc + PAD + disp[1]]
    return ndi.map_coordinates(big, coords, order=3).astype(np.float32)


def _interior(a: np.ndarray, m: int = 12) -> np.ndarray:
    return a[..., m:-m, m:-m]


@pytest.fixture(scope="module")
def pair_shift():
    big = _texture()[0]
    shift = np.array([2.3, -1.6])
    moving_clean = _crop(ndi.shift(big, shift, order=3))  # content moved by +shift
    moving = add_poisson_gaussian_noise(moving_clean, dose=20, seed=1)
    return moving, _crop(big), shift


def test_recovers_subpixel_shift(pair_shift):
    moving, fixed, shift = pair_shift
    before = moving.copy()
    aligned, report = register_pair(moving, fixed, method="rigid")
    np.testing.assert_array_equal(moving, before)  # input untouched
    assert report.shift.shape == (1, 2)
    # the shift that moves moving onto fixed undoes the applied one
    np.testing.assert_allclose(report.shift[0], -shift, atol=0.2)
    assert aligned.shape == fixed.shape and aligned.dtype == moving.dtype
    assert report.ncc_rigid[0] > report.ncc_before[0] + 0.1
    assert np.isnan(report.ncc_flow[0])  # rigid: no flow stage
    smooth = lambda a: ndi.gaussian_filter(a, 1.5)  # noqa: E731
    err_before = np.abs(_interior(smooth(moving) - smooth(fixed))).mean()
    err_after = np.abs(_interior(smooth(aligned) - smooth(fixed))).mean()
    assert err_after < 0.6 * err_before  # the rest is the noise


def test_flow_after_a_pure_shift_stays_small(pair_shift):
    moving, fixed, shift = pair_shift
    aligned, report, disp = register_pair(moving, fixed, method="flow", return_displacement=True)
    np.testing.assert_allclose(report.shift[0], -shift, atol=0.2)
    # aligned[r] = moving[r + d] and moving[q] = fixed[q - shift]: d ~ +shift everywhere;
    # the flow on top of the rigid stage is noise-level only
    residual = np.hypot(*(_interior(disp) - shift[:, None, None]))
    assert np.median(residual) < 0.5
    assert report.ncc_flow[0] >= report.ncc_rigid[0] - 0.01


@pytest.mark.parametrize("dose", [None, 20.0])
def test_recovers_smooth_warp(dose):
    big = _texture(seed=5)[0]
    true = _sinusoid(2.0)
    moving_clean = _warped(big, true)
    moving = (
        moving_clean
        if dose is None
        else add_poisson_gaussian_noise(moving_clean, dose=dose, seed=2)
    )
    fixed = _crop(big)
    aligned, report, disp = register_pair(moving, fixed, method="flow", return_displacement=True)
    # fixed[r] = moving[r - true(r)] to first order, so the displacement should be ~ -true
    before = np.hypot(*_interior(true)).mean()
    after = np.hypot(*_interior(disp + true)).mean()
    assert before > 1.0
    assert after < (0.2 if dose is None else 0.45) * before
    # cross-correlation rises through the stages; the flow stage does real work
    assert report.ncc_flow[0] > report.ncc_rigid[0] + 0.02
    assert report.ncc_flow[0] > report.ncc_before[0] + 0.05
    # intensity error of the clean moving image warped by the estimated displacement
    err_before = np.abs(_interior(moving_clean - fixed)).mean()
    err_after = np.abs(_interior(warp_image(moving_clean, disp) - fixed)).mean()
    assert err_after < 0.5 * err_before
    # the raw (noisy) moving image is what was warped
    np.testing.assert_allclose(aligned, warp_image(moving, disp), atol=1e-5)
    assert report.flow_p99[0] > 1.0


def test_report_is_consistent_across_slices():
    big = _texture(seed=7, n_z=3)
    fixed = _crop(big).copy()
    moving = np.stack([_crop(ndi.shift(b, (1.5, 0.7), order=3)) for b in big]).astype(np.float32)
    moving[1] = 0.5  # a blank slice (padding): nothing to align, NaN in the report
    fixed_before = fixed.copy()
    aligned, report = register_pair(moving, fixed)
    np.testing.assert_array_equal(fixed, fixed_before)
    assert isinstance(report, RegistrationReport) and report.n_slices == 3
    np.testing.assert_array_equal(aligned[1], moving[1])
    assert np.isnan(report.ncc_before[1]) and np.isnan(report.ncc_flow[1])
    # a stack is registered slice by slice: equal to registering each slice alone
    for z in (0, 2):
        single, part = register_pair(moving[z], fixed[z])
        np.testing.assert_allclose(aligned[z], single, atol=1e-5)
        np.testing.assert_allclose(report.shift[z], part.shift[0])
        np.testing.assert_allclose(report.ncc_flow[z], part.ncc_flow[0])
        assert -1 <= report.ncc_before[z] <= report.ncc_rigid[z] <= 1
    mean = report.mean()
    np.testing.assert_allclose(mean["ncc_flow"], np.nanmean(report.ncc_flow))
    np.testing.assert_allclose(mean["ncc_before"], report.ncc_before[[0, 2]].mean())
    np.testing.assert_allclose(mean["shift_y"], report.shift[:, 0].mean())
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert len(as_dict["slices"]) == 3
    assert as_dict["slices"][2]["ncc_rigid"] == pytest.approx(report.ncc_rigid[2])
    table = report.table()
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 2 and lines[-1].split()[0] == "mean"
    assert f"{mean['ncc_flow']:.4f}" in lines[-1]
    # the ncc helper is a plain Pearson correlation
    a, b = fixed[0], moving[0]
    np.testing.assert_allclose(ncc(a, b), np.corrcoef(a.ravel(), b.ravel())[0, 1], rtol=1e-6)


def test_register_pair_rejects_bad_input():
    a = np.zeros((32, 32), np.float32)
    with pytest.raises(InputError, match="same shape"):
        register_pair(a, np.zeros((32, 30), np.float32))
    with pytest.raises(InputError, match="unknown"):
        register_pair(a, a, method="elastic")
    with pytest.raises(InputError, match="--raft-weights"):
        register_pair(a, a, method="raft")


# ------------------------------------------------------------------------------ volumes / CLI


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    big = _texture(seed=11, n_z=2)
    fixed = _crop(big)
    true = _sinusoid(1.5)
    moving = np.stack([_warped(ndi.shift(b, (1.2, -0.8), order=3), true) for b in big])
    noisy = add_poisson_gaussian_noise(moving, dose=20, seed=4)
    to_u8 = lambda a: np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    paths = {"fixed": str(root / "clean.ome.zarr"), "moving": str(root / "noisy.ome.zarr")}
    io.write_image(to_u8(fixed), paths["fixed"], voxel_size=(30.0, 6.0, 6.0), chunks=(1, 64, 64))
    io.write_image(to_u8(noisy), paths["moving"], voxel_size=(30.0, 6.0, 6.0), chunks=(1, 64, 64))
    low = to_u8(noisy[:, ::2, ::2])
    paths["low"] = str(root / "low.ome.zarr")
    io.write_image(low, paths["low"], voxel_size=(30.0, 12.0, 12.0))
    paths["root"] = root
    return paths


def test_cli_writes_aligned_ome_zarr_and_report(volumes, tmp_path, capsys):
    out = tmp_path / "aligned.ome.zarr"
    png = tmp_path / "overlay.png"
    js = tmp_path / "report.json"
    argv = ["register", volumes["moving"], volumes["fixed"], str(out), "--chunks", "1,64,64"]
    assert main([*argv, "--report", str(png), "--report-json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "ncc_flow" in printed
    result = io.open_volume(str(out))
    fixed = io.open_volume(volumes["fixed"])
    moving = io.open_volume(volumes["moving"])
    assert result.shape == fixed.shape and result.dtype == moving.dtype
    np.testing.assert_allclose(result.voxel_size, fixed.voxel_size)
    # the chunked CLI run equals the in-memory API on the same arrays
    expected, report = register_pair(moving.data.compute(), fixed.data.compute())
    got = result.data.compute()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    saved = json.loads(js.read_text())
    assert saved["mean"]["ncc_flow"] == pytest.approx(report.mean()["ncc_flow"], abs=1e-6)
    assert saved["mean"]["ncc_flow"] > saved["mean"]["ncc_before"] + 0.05
    import matplotlib.pyplot as plt

    picture = plt.imread(str(png))
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > picture.shape[0]


def test_cli_low_high_pair_needs_upsample(volumes, tmp_path, capsys):
    out = tmp_path / "up.ome.zarr"
    assert main(["register", volumes["low"], volumes["fixed"], str(out)]) == 2
    assert "--upsample" in capsys.readouterr().err
    assert not out.exists()
    assert main(["register", volumes["low"], volumes["fixed"], str(out), "--upsample"]) == 0
    result = io.open_volume(str(out))
    fixed = io.open_volume(volumes["fixed"])
    assert result.shape == fixed.shape
    np.testing.assert_allclose(result.voxel_size, fixed.voxel_size)
    table = capsys.readouterr().out.splitlines()
    mean = table[[line.split()[0] if line.split() else "" for line in table].index("mean")].split()
    assert float(mean[5]) > float(mean[3])  # ncc after flow > before


def _exit2(argv, capsys, out, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_cli_bad_input_exits_2_and_writes_nothing(volumes, tmp_path, capsys):
    out = tmp_path / "o.ome.zarr"
    # shape mismatch (different z) without a resampling rule
    other = str(tmp_path / "short.ome.zarr")
    io.write_image(np.zeros((1, N, N), np.uint8), other, voxel_size=(30, 6, 6))
    _exit2(["register", other, volumes["fixed"], str(out)], capsys, out, "differs")
    assert not out.exists()
    _exit2(["register", other, volumes["fixed"], str(out), "--upsample"], capsys, out, "integer")
    assert not out.exists()
    # missing input
    _exit2(
        ["register", str(tmp_path / "nope.ome.zarr"), volumes["fixed"], str(out)],
        capsys,
        out,
        "does not exist",
    )
    assert not out.exists()
    # report in a folder that does not exist
    _exit2(
        [
            "register",
            volumes["moving"],
            volumes["fixed"],
            str(out),
            "--report",
            str(tmp_path / "x" / "r.png"),
        ],
        capsys,
        out,
        "does not exist",
    )
    assert not out.exists()
    # existing output is refused and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _exit2(["register", volumes["moving"], volumes["fixed"], str(out)], capsys, out, "exists")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    # output inside an input
    inside = volumes["fixed"] + "/aligned.ome.zarr"
    _exit2(
        ["register", volumes["moving"], volumes["fixed"], inside], capsys, out, "inside the input"
    )


def test_raft_is_refused_cleanly_without_local_weights(volumes, tmp_path, capsys):
    raft_loaded = "torchvision.models.optical_flow" in sys.modules
    out = tmp_path / "raft.ome.zarr"
    base = ["register", volumes["moving"], volumes["fixed"], str(out), "--method", "raft"]
    _exit2(base, capsys, out, "--raft-weights")
    _exit2([*base, "--raft-weights", str(tmp_path / "missing.pth")], capsys, out, "not found")
    assert not out.exists()
    # refused before torchvision is touched: no model built, nothing downloaded
    assert ("torchvision.models.optical_flow" in sys.modules) == raft_loaded
    # a file that exists but is no RAFT: refused (torchvision missing, or not a RAFT state dict)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    err = _exit2([*base, "--raft-weights", str(junk)], capsys, out, "")
    assert "torchvision" in err or "RAFT" in err
    assert not out.exists()
