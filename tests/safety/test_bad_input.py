"""Bad input through the CLI: one table, one row per problem.

Every row runs the real command in this process (`emdiffuse.cli.main`) and checks the project
rule for bad input: exit code 2; one line on stderr that names the problem and says what to
do (checked by key words); no traceback; nothing at the output path; the input (and the
checkpoint) byte for byte unchanged; a checkpoint's pickled code never ran.

"Volume smaller than a tile": a volume thinner than one z unit of an isotropic model (one
slice) is refused here; y and x smaller than the tile are not bad input (one tile, padded by
reflection, cropped back:
tests/pipeline/test_enhance.py::test_two_d_input_and_small_volume_padding).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from emdiffuse.cli import main
from emdiffuse.io import open_volume, write_image
from emdiffuse.models.checkpoints import load_checkpoint

FAST = ["--steps", "1", "--tile", "16", "--overlap", "4", "--threads", "--quiet"]


def _ome_zarr(path: Path, data: np.ndarray, axes: list[dict], scale: list[float] | None) -> str:
    """A hand-made OME-Zarr 0.5 image (for inputs `write_image` refuses to make)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,))
    if data.size:
        group["0"][...] = data
    dataset = {"path": "0"}
    if scale is not None:
        dataset["coordinateTransformations"] = [{"type": "scale", "scale": scale}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": axes, "datasets": [dataset]}],
    }
    return str(path)


def _space(names: str) -> list[dict]:
    return [{"name": a, "type": "space", "unit": "nanometer"} for a in names]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint, random_volume, pickled_code) -> dict[str, str]:
    """Models and inputs, good and bad (made once). The models are copied into ``root``,
    which every row watches for files a refused run leaves behind."""
    root = tmp_path_factory.mktemp("bad_input")
    w: dict[str, str] = {"root": str(root)}
    w["n"] = str(tiny_checkpoint("emdiffuse-n", folder=root))
    w["iso3"] = str(tiny_checkpoint("vemdiffuse-i", scale_factor=3, folder=root))
    w["sr2"] = str(tiny_checkpoint("emdiffuse-r", scale_factor=2, folder=root))

    w["good"] = str(random_volume((2, 24, 24)))
    good = np.asarray(open_volume(w["good"]).data)
    w["one_slice"] = str(root / "one_slice.ome.zarr")
    write_image(good[:1], w["one_slice"], voxel_size=(24.0, 8.0, 8.0))
    w["2d"] = str(root / "two_d.ome.zarr")
    write_image(good[0], w["2d"], voxel_size=(8.0, 8.0), axes="yx")

    plain = zarr.open_group(str(root / "plain_group.zarr"), mode="w")
    plain.create_array("data", shape=(2, 24, 24), dtype="f4")
    w["plain_group"] = str(root / "plain_group.zarr")
    w["plain_array"] = str(root / "plain_array.zarr")
    zarr.open_array(w["plain_array"], mode="w", shape=(2, 24, 24), dtype="f4")
    (root / "not_zarr").mkdir()
    (root / "not_zarr" / "notes.txt").write_text("not an image")
    w["not_zarr"] = str(root / "not_zarr")

    w["channels"] = _ome_zarr(
        root / "channels.ome.zarr",
        np.zeros((2, 2, 24, 24), np.float32),
        [{"name": "c", "type": "channel"}, *_space("zyx")],
        [1.0, 8.0, 8.0, 8.0],
    )
    w["one_d"] = _ome_zarr(root / "one_d.ome.zarr", np.zeros(24, np.float32), _space("x"), [8.0])
    w["complex"] = _ome_zarr(
        root / "complex.ome.zarr", np.zeros((2, 24, 24), np.complex64), _space("zyx"), [8.0] * 3
    )
    w["zero"] = _ome_zarr(
        root / "zero.ome.zarr", np.zeros((0, 24, 24), np.float32), _space("zyx"), [8.0] * 3
    )
    w["no_scale"] = _ome_zarr(root / "no_scale.ome.zarr", good, _space("zyx"), None)
    nan = good.copy()
    nan[1, 5, 7] = np.nan
    w["nan"] = str(root / "nan.ome.zarr")
    write_image(nan, w["nan"], voxel_size=(8.0, 8.0, 8.0))
    inf = good.copy()
    inf[0, 20, 3] = np.inf
    w["inf"] = str(root / "inf.ome.zarr")
    write_image(inf, w["inf"], voxel_size=(8.0, 8.0, 8.0))
    w["tiff"] = str(root / "no_voxel.tif")
    tifffile.imwrite(w["tiff"], (good * 255).astype(np.uint8))

    # checkpoints: truncated, garbage, pickled code (.pth and .pt bundles)
    data = Path(w["n"]).read_bytes()
    w["truncated"] = str(root / "truncated.safetensors")
    Path(w["truncated"]).write_bytes(data[: len(data) // 2])
    marker = root / "pickled-code-ran"
    w["marker"] = str(marker)
    denoise, state = load_checkpoint(w["n"])
    whole = root / "whole.pth"
    torch.save({"config": denoise.to_json(), "state_dict": state}, whole)
    w["truncated_pth"] = str(root / "truncated.pth")
    Path(w["truncated_pth"]).write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    w["evil_pth"] = str(root / "evil.pth")
    torch.save({"config": denoise.to_json(), "state_dict": state, "x": pickled_code(marker)},
               w["evil_pth"])
    w["evil_as_safetensors"] = str(root / "evil_renamed.safetensors")
    Path(w["evil_as_safetensors"]).write_bytes(Path(w["evil_pth"]).read_bytes())
    assert not marker.exists()

    (root / "a_file").write_text("a regular file")
    w["a_file"] = str(root / "a_file")
    w["existing"] = str(root / "existing.zarr")
    Path(w["existing"]).mkdir()
    (Path(w["existing"]) / "keep.txt").write_text("keep me")
    return w


# (row id, argv with {placeholders}; output is {out} unless the row says otherwise,
#  key words that must all appear in the message)
ROWS = [
    ("missing path", ["enhance", "{root}/absent.ome.zarr", "{out}", "--model", "{n}"],
     ["does not exist", "check the path"]),
    ("zarr group, not OME", ["enhance", "{plain_group}", "{out}", "--model", "{n}"],
     ["multiscales", "emdiffuse convert"]),
    ("zarr array, not OME", ["enhance", "{plain_array}", "{out}", "--model", "{n}"],
     ["not OME-Zarr", "emdiffuse convert"]),
    ("folder, not zarr", ["enhance", "{not_zarr}", "{out}", "--model", "{n}"],
     ["folder but not a Zarr", "emdiffuse convert"]),
    ("file, neither zarr nor tiff",
     ["enhance", "{not_zarr}/notes.txt", "{out}", "--model", "{n}"],
     ["neither an OME-Zarr folder nor a .tif", "emdiffuse convert"]),
    ("4D with channels", ["enhance", "{channels}", "{out}", "--model", "{n}"],
     ["non-spatial axis", "split"]),
    ("1D", ["enhance", "{one_d}", "{out}", "--model", "{n}"],
     ["1 axis", "2D image", "3D volume"]),
    ("complex dtype", ["enhance", "{complex}", "{out}", "--model", "{n}"],
     ["dtype complex64", "convert it"]),
    ("NaN", ["enhance", "{nan}", "{out}", "--model", "{n}"], ["NaN", "replace them"]),
    ("inf", ["enhance", "{inf}", "{out}", "--model", "{n}"], ["inf", "replace them"]),
    ("zero-size axis", ["enhance", "{zero}", "{out}", "--model", "{n}"],
     ["size zero", "give a non-empty image"]),
    ("volume thinner than a tile (isotropic, 1 slice)",
     ["enhance", "{one_slice}", "{out}", "--model", "{iso3}"],
     ["at least 2 z-slices", "give a 3D volume"]),
    ("isotropic checkpoint on a denoise run",
     ["enhance", "{good}", "{out}", "--model", "{iso3}", "--task", "denoise"],
     ["isotropic", "asks for denoise", "use a denoise checkpoint"]),
    ("isotropic checkpoint on a 2D image", ["enhance", "{2d}", "{out}", "--model", "{iso3}"],
     ["2D", "give a 3D (zyx) volume"]),
    ("scale factor mismatch (--factor)",
     ["enhance", "{good}", "{out}", "--model", "{sr2}", "--factor", "4"],
     ["scale factor 2", "scale factor 4", "matching checkpoint"]),
    ("scale factor mismatch (anisotropy)", ["enhance", "{good}", "{out}", "--model", "{iso3}"],
     ["z step", "3x", "--voxel-size"]),
    ("corrupt checkpoint (truncated)", ["enhance", "{good}", "{out}", "--model", "{truncated}"],
     ["corrupt or truncated"]),
    ("corrupt checkpoint (truncated .pth)",
     ["enhance", "{good}", "{out}", "--model", "{truncated_pth}"],
     ["corrupt or truncated"]),
    ("checkpoint with pickled code (.pth)",
     ["enhance", "{good}", "{out}", "--model", "{evil_pth}"],
     ["refusing to load", "could run code", "safetensors"]),
    ("checkpoint with pickled code (renamed .safetensors)",
     ["enhance", "{good}", "{out}", "--model", "{evil_as_safetensors}"],
     ["not a readable .safetensors", "corrupt or truncated"]),
    ("checkpoint missing", ["enhance", "{good}", "{out}", "--model", "{root}/absent.safetensors"],
     ["checkpoint", "does not exist"]),
    ("voxel size missing (TIFF)", ["enhance", "{tiff}", "{out}", "--model", "{n}"],
     ["does not record its voxel size", "--voxel-size"]),
    ("voxel size missing (OME-Zarr without scale)",
     ["enhance", "{no_scale}", "{out}", "--model", "{n}"],
     ["does not record its voxel size", "--voxel-size"]),
    ("voxel size not positive",
     ["enhance", "{tiff}", "{out}", "--model", "{n}", "--voxel-size", "0,8,8"],
     ["must be positive", "--voxel-size", "nm"]),
    ("tile not a multiple", ["enhance", "{good}", "{out}", "--model", "{n}", "--tile", "18"],
     ["multiple of", "--tile"]),
    ("output exists", ["enhance", "{good}", "{existing}", "--model", "{n}"],
     ["exists", "--overwrite", "--resume"]),
    ("output inside the input", ["enhance", "{good}", "{good}/inner.zarr", "--model", "{n}"],
     ["inside the input", "elsewhere"]),
    ("output below a regular file", ["enhance", "{good}", "{a_file}/out.zarr", "--model", "{n}"],
     ["is a file, not a folder", "choose another output"]),
    ("output in an unwritable folder", ["enhance", "{good}", "/proc/emdiffuse-out.zarr",
                                        "--model", "{n}"],
     ["not writable", "writable folder"]),
    ("output folder missing", ["enhance", "{good}", "{root}/no/such/out.zarr", "--model", "{n}"],
     ["does not exist", "create it first"]),
    ("unknown sampler (option)",
     ["enhance", "{good}", "{out}", "--model", "{n}", "--sampler", "euler"],
     ["--sampler", "invalid choice: 'euler'", "dpmpp_2m", "emdiffuse enhance --help"]),
    ("unknown spacing (option)",
     ["enhance", "{good}", "{out}", "--model", "{n}", "--spacing", "uniform"],
     ["--spacing", "invalid choice: 'uniform'", "karras", "emdiffuse enhance --help"]),
    ("start noise not positive",
     ["enhance", "{good}", "{out}", "--model", "{n}", "--start-noise", "-1"],
     ["start_noise must be a positive number", "e.g. 2"]),
    ("start noise on time spacing",
     ["enhance", "{good}", "{out}", "--model", "{n}", "--sampler", "ddpm", "--start-noise", "2"],
     ["start_noise needs logsnr or karras spacing", "--spacing karras"]),
    ("start noise for a model without a mean",
     ["enhance", "{good}", "{out}", "--model", "{n}", "--spacing", "karras", "--start-noise", "2"],
     ["--start-noise is for mean-plus-residual models", "leave it out"]),
    ("steps not a number (option)",
     ["enhance", "{good}", "{out}", "--model", "{n}", "--steps", "eight"],
     ["--steps", "invalid int value: 'eight'"]),
    ("required option missing", ["enhance", "{good}", "{out}"],
     ["the following arguments are required: --model"]),
    ("convert: voxel size missing", ["convert", "{tiff}", "{out}"],
     ["does not record its voxel size", "--voxel-size"]),
    ("convert: NaN", ["convert", "{nan}", "{out}"], ["NaN", "replace them"]),
    ("info: not OME", ["info", "{plain_group}"], ["multiscales", "emdiffuse convert"]),
]


def _digest(path: str) -> str:
    """SHA-256 over a file, or over every file (names, bytes) of a folder."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_table(world, tmp_path, capsys, row):
    _, argv, words = row
    out = tmp_path / "out.zarr"
    args = [a.format(out=out, **world) for a in argv]
    if args[0] == "enhance":
        args = [args[0], *FAST, *args[1:]]  # the row's own options come last and win
    existing = [a for a in args if a in world.values() and Path(a).exists()]
    before = {path: _digest(path) for path in existing}
    places = [Path(world["root"]), tmp_path]  # where a refused run could leave something
    files_before = {p for place in places for p in place.rglob("*")}

    code = main(args)

    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, (args, err)
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"emdiffuse {args[0]}: error: "), err
    assert "Traceback" not in err + captured.out
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()  # nothing written
    assert {p for place in places for p in place.rglob("*")} == files_before  # nor elsewhere
    assert {path: _digest(path) for path in existing} == before  # inputs untouched
    assert not Path(world["marker"]).exists()  # pickled code never ran
    assert sorted(p.name for p in Path(world["existing"]).iterdir()) == ["keep.txt"]
    assert not list(Path(world["root"]).glob(".emdiffuse-write-test-*"))

