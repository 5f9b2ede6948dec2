"""HDF5, N5, neuroglancer precomputed and MRC inputs (issue 17), local and over HTTP.

Each volume is written by the format's own library (h5py, tensorstore, mrcfile; N5 group
attributes by the published layout), then ``info``, ``convert``, ``enhance`` and one
training step read it. The enhanced output equals the output of the same data written as
OME-Zarr, voxel size and translation included. Damaged input of each format is one line,
exit 2, and nothing is written. Remote reads go to a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pickle
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
ts = pytest.importorskip("tensorstore")
mrcfile = pytest.importorskip("mrcfile")

from emdiffuse import io  # noqa: E402
from emdiffuse.cli import main  # noqa: E402
from emdiffuse.errors import InputError  # noqa: E402
from emdiffuse.io.regions import RegionReader, backing_reader  # noqa: E402
from emdiffuse.models.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from emdiffuse.models.enhancer import Enhancer  # noqa: E402
from emdiffuse.models.presets import make_config  # noqa: E402

SHAPE = (3, 32, 40)
VOXEL = (40.0, 4.0, 4.0)
SHIFT = (80.0, 8.0, 12.0)  # translation in nm: 2, 2 and 3 voxels
FAST = ["--steps", "1", "--tile", "32", "--overlap", "8", "--quiet"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stack(dtype=np.uint8) -> np.ndarray:
    """A smooth-ish 8-bit volume (so a denoiser has structure to work on)."""
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    clean = 120 + 80 * np.sin(0.31 * x + 0.17 * y + 0.5 * z) * np.cos(0.23 * y - 0.11 * x)
    return np.clip(clean + rng.normal(0, 12, SHAPE), 0, 255).astype(dtype)


STACK = _stack()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny denoiser (intensities 0..255) with every weight perturbed, so its output
    depends on its input (a fresh network's output layer is zero)."""
    import torch

    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 255.0})
    generator = torch.Generator().manual_seed(1)
    state = {
        name: t + 0.05 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
        for name, t in Enhancer.from_config(config, seed=0).net.state_dict().items()
    }
    path = tmp_path_factory.mktemp("model") / "n.safetensors"
    save_checkpoint(path, state, config)
    return str(path)


# ---- writers: each format by its own library ----------------------------------------------
def _write_hdf5_cremi(root: Path) -> str:
    path = root / "cremi.h5"
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("volumes/raw", data=STACK, chunks=(1, 16, 20), compression="gzip")
        raw.attrs["resolution"] = VOXEL  # CREMI: zyx, nm
        raw.attrs["offset"] = SHIFT
        f.create_dataset("volumes/labels/neuron_ids", data=STACK.astype(np.uint64), chunks=(1, 16, 20))
        f.create_dataset("annotations/locations", data=np.zeros((4, 3), np.float32))
    return f"{path}:/volumes/raw"


def _write_hdf5_ilastik(root: Path) -> str:
    path = root / "ilastik.h5"
    with h5py.File(path, "w") as f:
        data = f.create_dataset("exported_data", data=STACK[..., None], chunks=(3, 16, 40, 1))
        data.attrs["element_size_um"] = [v / 1000 for v in VOXEL]
        keys = [{"key": k, "typeFlags": 2, "resolution": 0, "description": ""} for k in "zyxc"]
        data.attrs["axistags"] = json.dumps({"axes": keys})
    return f"{path}#/exported_data"


def _n5_dataset(path: Path, data: np.ndarray, block, attrs: dict) -> None:
    """An N5 dataset written by tensorstore (N5 lists axes x first), then its attributes."""
    store = ts.open({
        "driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(block[::-1]),
                     "dataType": data.dtype.name, "compression": {"type": "gzip"}},
        "create": True, "delete_existing": True,
    }).result()  # fmt: skip
    store.write(data.T).result()
    meta = json.loads((path / "attributes.json").read_text())
    (path / "attributes.json").write_text(json.dumps({**meta, **attrs}))


def _downsample(data: np.ndarray) -> np.ndarray:
    z, y, x = data.shape
    return data[:, : y // 2 * 2, : x // 2 * 2].reshape(z, y // 2, 2, x // 2, 2).mean((2, 4)).astype(data.dtype)


def _write_n5_cosem(root: Path) -> str:
    """COSEM / OpenOrganelle: a multiscale group, per-level ``transform`` and ``pixelResolution``."""
    group = root / "cosem.n5" / "em" / "fibsem-uint8"
    group.mkdir(parents=True)
    (root / "cosem.n5" / "attributes.json").write_text(json.dumps({"n5": "2.5.0"}))
    datasets = []
    for level, data in enumerate((STACK, _downsample(STACK))):
        f = 2**level
        scale = [VOXEL[0], VOXEL[1] * f, VOXEL[2] * f]
        translate = [SHIFT[0], SHIFT[1] + (f - 1) * VOXEL[1] / 2, SHIFT[2] + (f - 1) * VOXEL[2] / 2]
        transform = {"axes": ["z", "y", "x"], "ordering": "C", "scale": scale, "translate": translate,
                     "units": ["nm", "nm", "nm"]}  # fmt: skip
        _n5_dataset(group / f"s{level}", data, (2, 16, 16),
                    {"transform": transform, "pixelResolution": {"dimensions": scale[::-1], "unit": "nm"}})  # fmt: skip
        datasets.append({"path": f"s{level}", "transform": transform})
    (group / "attributes.json").write_text(json.dumps({"multiscales": [{"datasets": datasets, "name": "fibsem"}]}))
    return str(group)


def _write_n5_viewer(root: Path) -> str:
    """n5-viewer / BigDataViewer style: the group's ``pixelResolution`` and ``scales``."""
    group = root / "viewer.n5"
    group.mkdir()
    (group / "attributes.json").write_text(json.dumps({
        "n5": "2.5.0", "pixelResolution": {"dimensions": VOXEL[::-1], "unit": "nm"},
        "scales": [[1, 1, 1], [2, 2, 1]],
    }))  # fmt: skip
    _n5_dataset(group / "s0", STACK, (3, 16, 20), {"downsamplingFactors": [1, 1, 1]})
    _n5_dataset(group / "s1", _downsample(STACK), (3, 16, 20), {"downsamplingFactors": [2, 2, 1]})
    return str(group)


def _write_precomputed(root: Path, encoding: str = "raw", name: str = "precomputed", kind: str = "image",
                       data: np.ndarray = STACK) -> str:  # fmt: skip
    path = root / name
    offset = [int(s / v) for s, v in zip(SHIFT[::-1], VOXEL[::-1], strict=True)]  # x y z voxels
    for level, values in enumerate((data, _downsample(data))):
        f = 2**level
        scale = {"size": list(values.shape[::-1]), "resolution": [VOXEL[2] * f, VOXEL[1] * f, VOXEL[0]],
                 "voxel_offset": [offset[0] // f, offset[1] // f, offset[2]], "chunk_size": [20, 16, 2],
                 "encoding": encoding}  # fmt: skip
        if encoding == "compressed_segmentation":
            scale["compressed_segmentation_block_size"] = [8, 8, 2]
        store = ts.open({
            "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
            "multiscale_metadata": {"type": kind, "data_type": values.dtype.name, "num_channels": 1},
            "scale_metadata": scale, "create": True, "open": True,
        }).result()  # fmt: skip
        store[..., 0].write(values.T).result()
    return str(path)


def _write_mrc(root: Path, data: np.ndarray = STACK, name: str = "tomo.mrc") -> str:
    path = root / name
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = tuple(v * 10 for v in VOXEL[::-1])  # Å, x y z
        mrc.header.origin = tuple(s * 10 for s in SHIFT[::-1])
    return str(path)


def _jpeg_values(path: str) -> np.ndarray:
    """What a lossy (jpeg) precomputed volume decodes to, read by tensorstore itself."""
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": path}}).result()
    return np.asarray(store[..., 0].read().result()).T


# name -> (writer, voxel size, translation); the expected values are STACK unless noted
FORMATS = {
    "hdf5-cremi": (_write_hdf5_cremi, VOXEL, SHIFT),
    "hdf5-ilastik": (_write_hdf5_ilastik, VOXEL, (0.0, 0.0, 0.0)),
    "n5-cosem": (_write_n5_cosem, VOXEL, SHIFT),
    "n5-viewer": (_write_n5_viewer, VOXEL, (0.0, 0.0, 0.0)),
    "precomputed-raw": (_write_precomputed, VOXEL, SHIFT),
    "precomputed-jpeg": (functools.partial(_write_precomputed, encoding="jpeg", name="jpeg"), VOXEL, SHIFT),
    "mrc": (functools.partial(_write_mrc, data=STACK.astype(np.float32)), VOXEL, SHIFT),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, (writer, _, _) in FORMATS.items():
        path = writer(root)
        values = _jpeg_values(path) if name.endswith("jpeg") else STACK
        out[name] = (path, values.astype(np.float32) if name == "mrc" else values)
    return out


@pytest.fixture(scope="module")
def enhanced(model, tmp_path_factory):
    """``enhanced(path, scheduler="threads")``: the input enhanced by the CLI (as a Volume),
    once per module for each input and scheduler."""
    root = tmp_path_factory.mktemp("enhanced")
    done: dict[tuple[str, str], io.Volume] = {}

    def run(path: str, scheduler: str = "threads") -> io.Volume:
        if (path, scheduler) not in done:
            out = root / f"{len(done)}.ome.zarr"
            how = ["--threads"] if scheduler == "threads" else ["--workers", "1"]
            assert main(["enhance", path, str(out), "--model", model, *FAST, *how]) == 0
            done[path, scheduler] = io.open_volume(out)
        return done[path, scheduler]

    return run


def _one_line_error(capfd, command: str, *words: str) -> str:
    captured = capfd.readouterr()
    err = captured.err
    assert err.startswith(f"emdiffuse {command}: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err + captured.out
    for word in words:
        assert word in err, (word, err)
    return err


# ---- every format: open, info, convert, enhance == OME-Zarr, one training step -------------
@pytest.mark.parametrize("name", list(FORMATS))
def test_open_info_convert_enhance_equal_ome_zarr(name, written, enhanced, tmp_path, capsys):
    path, values = written[name]
    _, voxel, shift = FORMATS[name]
    volume = io.open_volume(path)
    assert volume.axes == "zyx" and volume.shape == SHAPE
    assert volume.voxel_size == pytest.approx(voxel) and volume.translation == pytest.approx(shift)
    np.testing.assert_array_equal(volume.data.compute(), values)
    reader = backing_reader(volume.data)
    assert isinstance(reader, RegionReader)  # what the pipeline's tasks and the loader slice
    np.testing.assert_array_equal(reader[1:3, 5:20, 7:9], values[1:3, 5:20, 7:9])
    np.testing.assert_array_equal(reader[2, 3:9], values[2, 3:9])

    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert str(SHAPE) in out and "(40, 4, 4) nm" in out and "not usable" not in out
    kind = {"hdf5": "HDF5", "n5": "N5", "precomputed": "neuroglancer precomputed", "mrc": "MRC"}
    assert f"format      {kind[name.split('-')[0]]}" in out

    converted = tmp_path / "converted.ome.zarr"
    assert main(["convert", path, str(converted)]) == 0
    back = io.open_volume(converted)
    np.testing.assert_array_equal(back.data.compute(), values)
    assert back.voxel_size == pytest.approx(voxel) and back.translation == pytest.approx(shift)

    reference = tmp_path / "reference.ome.zarr"  # the same data as OME-Zarr, same chunk grid
    io.write_image(values, reference, voxel_size=voxel, translation=shift,
                   chunks=tuple(c[0] for c in volume.data.chunks))  # fmt: skip
    # on worker processes for two formats: they open the input themselves, by its location
    scheduler = "workers" if name in ("hdf5-cremi", "n5-cosem") else "threads"
    result, wanted = enhanced(path, scheduler), enhanced(str(reference))
    np.testing.assert_array_equal(result.data.compute(), wanted.data.compute())
    assert result.voxel_size == wanted.voxel_size == pytest.approx(voxel)
    assert result.translation == wanted.translation == pytest.approx(shift)


def test_enhanced_output_depends_on_the_input(written, enhanced, tmp_path):
    """The equality above is not that of a model that ignores its input."""
    other = tmp_path / "other.ome.zarr"
    io.write_image(255 - STACK, other, voxel_size=VOXEL, translation=SHIFT, chunks=(1, 16, 20))
    a = enhanced(written["hdf5-cremi"][0]).data.compute()
    assert not np.array_equal(a, enhanced(str(other)).data.compute())


@pytest.mark.parametrize("name", list(FORMATS))
def test_one_training_step_reads_the_format(name, written, tmp_path):
    from emdiffuse.training.chunks import open_source

    path, values = written[name]
    array, voxel, _ = open_source(path, None)
    assert isinstance(array, RegionReader) and voxel == pytest.approx(FORMATS[name][1])
    out = tmp_path / "run"
    code = main(["train", "--task", "denoise", "--data", f"{path},{path}", "--out", str(out),
                 "--steps", "1", "--batch-size", "1", "--patch", "16", "--no-progress",
                 "--device", "cpu", "--val-fraction", "0"])  # fmt: skip
    assert code == 0 and (out / "model.safetensors").exists()
    config, _ = load_checkpoint(out / "model.safetensors")
    assert tuple(config.voxel_size_nm) == pytest.approx(FORMATS[name][1])


def test_training_loader_workers_read_tensorstore_inputs(written):
    """tensorstore forbids use after fork: loader workers are spawned when it is loaded."""
    from emdiffuse.training.loader import PatchDataset, make_loader

    path, _ = written["n5-cosem"]
    dataset = PatchDataset("denoise", [path, path], patch=16, batch_size=1, seed=0, val_fraction=0)
    spawned = next(iter(make_loader(dataset, workers=1)))
    here = next(iter(make_loader(dataset, workers=0)))
    assert spawned.keys() == here.keys()
    for key, value in here.items():  # the same patches, whichever process read them
        if hasattr(value, "shape"):
            np.testing.assert_array_equal(np.asarray(spawned[key]), np.asarray(value))


# ---- levels, pickling, identity ------------------------------------------------------------
@pytest.mark.parametrize("name", ["n5-cosem", "n5-viewer", "precomputed-raw"])
def test_level_picks_a_scale(name, written, tmp_path, capsys):
    path, _ = written[name]
    level1 = io.open_volume(path, level=1)
    assert level1.shape == (3, 16, 20)
    assert level1.voxel_size == pytest.approx((40.0, 8.0, 8.0))
    np.testing.assert_array_equal(level1.data.compute(), _downsample(STACK))
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "level 1" in out and "(3, 16, 20)" in out
    converted = tmp_path / "l1.ome.zarr"
    assert main(["convert", path, str(converted), "--level", "1"]) == 0
    assert io.open_volume(converted).shape == (3, 16, 20)
    assert main(["convert", path, str(tmp_path / "l9.ome.zarr"), "--level", "9"]) == 2
    _one_line_error(capsys, "convert", "level 9 does not exist")
    assert not (tmp_path / "l9.ome.zarr").exists()


def test_hdf5_multiscale_group_and_single_dataset(tmp_path):
    path = tmp_path / "pyramid.h5"
    with h5py.File(path, "w") as f:
        for level, data in enumerate((STACK, _downsample(STACK))):
            d = f.create_dataset(f"raw/s{level}", data=data, chunks=(1, 16, 20))
            d.attrs["resolution"] = [VOXEL[0], VOXEL[1] * 2**level, VOXEL[2] * 2**level]
    level1 = io.open_volume(f"{path}:/raw", level=1)
    assert level1.voxel_size == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(level1.data.compute(), _downsample(STACK))
    single = tmp_path / "single.h5"
    with h5py.File(single, "w") as f:  # one image dataset: no path needed
        f.create_dataset("stack", data=STACK)
    assert io.open_volume(str(single), voxel_size=8).shape == SHAPE


@pytest.mark.parametrize("name", ["hdf5-cremi", "n5-cosem", "precomputed-raw", "mrc"])
def test_readers_pickle_and_reopen(name, written):
    import emdiffuse.io.regions as regions

    path, values = written[name]
    data = io.open_volume(path).data
    copy = pickle.loads(pickle.dumps(data))
    regions._HANDLES.clear()  # as in a fresh worker process: opened again from the location
    np.testing.assert_array_equal(copy.compute(scheduler="threads"), values)


def test_identity_changes_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=STACK).attrs["resolution"] = VOXEL
    first = io.input_identity(f"{path}:/raw")
    old = io.open_volume(f"{path}:/raw")
    replacement = tmp_path / "b.h5"
    with h5py.File(replacement, "w") as f:
        f.create_dataset("raw", data=255 - STACK).attrs["resolution"] = VOXEL
    os.replace(replacement, path)
    assert io.input_identity(f"{path}:/raw") != first
    new = io.open_volume(f"{path}:/raw")
    np.testing.assert_array_equal(new.data.compute(), 255 - STACK)  # never a stale handle
    assert backing_reader(old.data).token != backing_reader(new.data).token


def test_mrc_modes_and_imod_unsigned_bytes(tmp_path):
    for dtype in (np.int8, np.int16, np.float32, np.uint16, np.float16):
        values = (STACK // 2).astype(dtype)
        path = _write_mrc(tmp_path, values, f"{np.dtype(dtype).name}.mrc")
        volume = io.open_volume(path)
        assert volume.dtype == dtype and volume.voxel_size == pytest.approx(VOXEL)
        np.testing.assert_array_equal(volume.data.compute(), values)
    path = Path(_write_mrc(tmp_path, STACK.view(np.int8), "imod.mrc"))  # the bytes of STACK
    raw = bytearray(path.read_bytes())
    raw[152:160] = np.array([1146047817, 0], "<i4").tobytes()  # IMOD stamp, flags: unsigned bytes
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(io.open_volume(str(path)).data.compute(), STACK)


# ---- remote: a local HTTP server -----------------------------------------------------------
class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with byte ranges (fsspec reads HDF5 and MRC files range by range)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not header or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, _, end = header.removeprefix("bytes=").partition("-")
        start, end = int(start or 0), min(int(end) if end else size - 1, size - 1)
        handle = open(path, "rb")  # noqa: SIM115 - closed by the server after copyfile
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(handle, end - start + 1)


class _Limited:
    def __init__(self, handle, length: int) -> None:
        self.handle, self.left = handle, length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.handle.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


@pytest.fixture(scope="module")
def served(written):
    """The written volumes behind http://127.0.0.1:PORT/ (this machine only)."""
    root = Path(written["mrc"][0]).parent
    handler = functools.partial(_RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["n5-cosem", "precomputed-raw", "hdf5-cremi", "mrc"])
def test_remote_over_http(name, written, served, enhanced, tmp_path, capsys):
    base, root = served
    path, values = written[name]
    url = base + "/" + Path(path.split(":/")[0].split("#")[0]).relative_to(root).as_posix()
    url += path[len(path.split(":/")[0]) :] if name.startswith("hdf5") else ""
    if name == "precomputed-raw":
        url = "precomputed://" + url
    volume = io.open_volume(url)
    assert volume.voxel_size == pytest.approx(VOXEL) and volume.translation == pytest.approx(SHIFT)
    np.testing.assert_array_equal(volume.data.compute(), values)
    assert main(["info", url]) == 0
    assert str(SHAPE) in capsys.readouterr().out
    converted = tmp_path / "c.ome.zarr"
    assert main(["convert", url, str(converted)]) == 0
    np.testing.assert_array_equal(io.open_volume(converted).data.compute(), values)
    remote, local = enhanced(url), enhanced(path)
    np.testing.assert_array_equal(remote.data.compute(), local.data.compute())
    assert (remote.voxel_size, remote.translation) == (local.voxel_size, local.translation)


# ---- damaged and unusable input: one line, exit 2, nothing written -------------------------
def _commands(path: str, out: Path, model: str) -> dict[str, list[str]]:
    return {
        "info": ["info", path],
        "convert": ["convert", path, str(out)],
        "enhance": ["enhance", path, str(out), "--model", model, *FAST, "--threads"],
    }


def _refused(capfd, tmp_path, model, path: str, *words: str, commands=("info", "convert", "enhance")):
    for command in commands:
        out = tmp_path / f"{command}.ome.zarr"
        args = _commands(path, out, model)[command]
        assert main(args) == 2, command
        _one_line_error(capfd, command, *words)
        assert not out.exists(), command


def test_truncated_hdf5(tmp_path, capfd, model):
    whole = Path(_write_hdf5_cremi(tmp_path).split(":")[0])
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _refused(capfd, tmp_path, model, f"{cut}:/volumes/raw", "cut.h5", "truncated or corrupt HDF5")


def test_hdf5_dataset_that_does_not_exist(tmp_path, capfd, model):
    path = _write_hdf5_cremi(tmp_path).split(":")[0]
    _refused(capfd, tmp_path, model, f"{path}:/volumes/nothere", "has no dataset /volumes/nothere",
             "/volumes/raw")  # fmt: skip
    _refused(capfd, tmp_path, model, path, "holds 2 image datasets", ":/volumes/raw")
    _refused(capfd, tmp_path, model, f"{path}:/annotations/locations", "not an image")


def test_damaged_hdf5_chunk_is_named(tmp_path, capfd, model):
    path = Path(_write_hdf5_cremi(tmp_path).split(":")[0])
    with h5py.File(path, "r") as f:
        info = f["volumes/raw"].id.get_chunk_info_by_coord((2, 16, 0))
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset : info.byte_offset + info.size] = bytes(info.size)  # same length
    path.write_bytes(bytes(raw))
    _refused(capfd, tmp_path, model, f"{path}:/volumes/raw", "chunk (2, 1, 0)", "cannot be read",
             commands=("convert", "enhance"))  # fmt: skip
    out = tmp_path / "w.ome.zarr"
    args = ["enhance", f"{path}:/volumes/raw", str(out), "--model", model,
            *FAST, "--workers", "1"]  # fmt: skip
    assert main(args) == 2
    _one_line_error(capfd, "enhance", "chunk (2, 1, 0)")
    assert not out.exists()


def test_n5_with_missing_attributes(tmp_path, capfd, model):
    group = Path(_write_n5_cosem(tmp_path))
    (group / "s0" / "attributes.json").unlink()
    _refused(capfd, tmp_path, model, str(group), "s0 has no attributes.json", "attributes are missing")
    viewer = Path(_write_n5_viewer(tmp_path))
    attrs = json.loads((viewer / "s0" / "attributes.json").read_text())
    del attrs["dataType"]
    (viewer / "s0" / "attributes.json").write_text(json.dumps(attrs))
    _refused(capfd, tmp_path, model, str(viewer), "damaged N5 dataset", "lacks dataType")
    _refused(capfd, tmp_path, model, str(tmp_path / "nothere.n5"), "does not exist")


def test_damaged_n5_chunk_is_named(tmp_path, capfd, model):
    group = Path(_write_n5_cosem(tmp_path))
    (group / "s0" / "1" / "0" / "0").write_bytes(b"\x00\x00\x00\x03 not a block")
    _refused(capfd, tmp_path, model, str(group), "chunk (0, 0, 1)", "stored as 1/0/0",
             commands=("convert", "enhance"))  # fmt: skip


def test_precomputed_info_that_disagrees_with_its_chunks(tmp_path, capfd, model):
    path = Path(_write_precomputed(tmp_path))
    info = json.loads((path / "info").read_text())
    info["scales"][0]["chunk_sizes"] = [[10, 16, 2]]  # the stored chunks are 20 x 16 x 2
    (path / "info").write_text(json.dumps(info))
    _refused(capfd, tmp_path, model, str(path), "info disagrees with its chunks")
    # a remote volume cannot be listed: its first chunk must decode to the info's size
    (path / "info").write_text(json.dumps({**info, "scales": [{**info["scales"][0], "chunk_sizes": [[20, 16, 2]]}]}))
    first = next(p for p in (path / info["scales"][0]["key"]).iterdir() if p.name.startswith("3-23_2-18_2-4"))
    first.write_bytes(first.read_bytes()[:-7])
    _refused(capfd, tmp_path, model, str(path), "chunk (0, 0, 0)", "disagrees with its chunks",
             commands=("info", "convert"))  # fmt: skip


def test_precomputed_segmentation_is_described_not_enhanced(tmp_path, capfd, model):
    path = _write_precomputed(tmp_path, "compressed_segmentation", "seg", "segmentation", STACK.astype(np.uint32))
    assert main(["info", path]) == 0
    assert "not usable" in capfd.readouterr().out
    _refused(capfd, tmp_path, model, path, "segmentation volume (labels), not an image",
             commands=("convert", "enhance"))  # fmt: skip
    image = _write_precomputed(tmp_path, "compressed_segmentation", "cseg", "image", STACK.astype(np.uint32))
    np.testing.assert_array_equal(io.open_volume(image).data.compute(), STACK)


def test_mrc_with_a_wrong_header(tmp_path, capfd, model):
    path = Path(_write_mrc(tmp_path))
    good = path.read_bytes()
    no_id = tmp_path / "noid.mrc"
    no_id.write_bytes(good[:208] + b"XXXX" + good[212:])
    _refused(capfd, tmp_path, model, str(no_id), "wrong MRC header", "Map ID")
    longer = tmp_path / "nz.mrc"
    longer.write_bytes(good[:8] + np.array([9], "<i4").tobytes() + good[12:])  # nz 5 -> 9
    _refused(capfd, tmp_path, model, str(longer), "wrong MRC header", "40x32x9 voxels")
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(good[:-100])
    _refused(capfd, tmp_path, model, str(cut), "truncated or its header is wrong")
    complex_ = tmp_path / "fft.mrc"
    with mrcfile.new(complex_) as mrc:
        mrc.set_data(STACK.astype(np.complex64))
    _refused(capfd, tmp_path, model, str(complex_), "mode 4", "complex", "not an image")


def test_missing_extra_names_the_install(tmp_path, capfd, model, monkeypatch, written):
    for module, name in (("h5py", "hdf5-cremi"), ("tensorstore", "n5-cosem"), ("mrcfile", "mrc")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # import fails as if not installed
            _refused(capfd, tmp_path, model, written[name][0], module, "pip install 'emdiffuse[formats]'")


def test_format_detection(tmp_path, written):
    from emdiffuse.io.paths import input_format, local_path, split_inner

    assert split_inner("a/b.h5:/volumes/raw") == ("a/b.h5", "/volumes/raw")
    assert split_inner("https://h/b.hdf5#/x") == ("https://h/b.hdf5", "/x")
    assert local_path("precomputed:///data/em") == Path("/data/em")
    assert input_format("precomputed://gs://bucket/em") == "precomputed"
    assert input_format("n5://https://host/data") == "n5"
    assert input_format("s3://bucket/x.n5/em/s0") == "n5"
    assert input_format("https://host/a.ome.zarr") == "ome-zarr"
    for name in FORMATS:  # what the folders and files hold, whatever their names
        path = written[name][0]
        plain = tmp_path / f"plain-{name}"
        source = Path(path.split(":/")[0].split("#")[0])
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, plain)
        assert input_format(str(plain)) == name.split("-")[0], name


def test_region_reader_refuses_fancy_indexing(written):
    reader = backing_reader(io.open_volume(written["hdf5-cremi"][0]).data)
    with pytest.raises(TypeError):
        reader[::2]
    with pytest.raises(InputError):
        io.open_volume(written["hdf5-cremi"][0], level=3)
