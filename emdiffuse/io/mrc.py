"""Read MRC files (cryo-ET tomograms, cryo-EM maps, image stacks) through mrcfile.

The header is read and checked by mrcfile (map ID, machine stamp) and here (mode, axis
mapping, the data's length against the file's); a wrong header is an InputError. Local
files are memory-mapped; a URL is read range by range through fsspec (one request per
z-slice of a region).

Modes 0 (int8; unsigned bytes in IMOD files that say so), 1 (int16), 2 (float32), 6
(uint16) and 12 (float16) are images; the complex modes 3 and 4 (Fourier transforms) and
the packed 4-bit mode 101 are refused. The voxel size comes from the header (``cella`` /
``mx, my, mz``, in Å, converted to nm; 0 means unknown), the axis order from
``mapc, mapr, maps``, and the translation from ``origin`` (Å) or else ``nxstart,
nystart, nzstart`` (voxels).
"""

from __future__ import annotations

import io
import struct

import fsspec
import numpy as np

from emdiffuse.errors import InputError
from emdiffuse.io.image import RawImage
from emdiffuse.io.paths import container, exists, file_identity, is_url, local_path
from emdiffuse.io.regions import RegionReader, dask_chunks, one_line, require

_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_REFUSED = {
    3: "complex int16 (a Fourier transform)",
    4: "complex float32 (a Fourier transform)",
    101: "packed 4-bit",
}
_IMOD_STAMP = 1146047817  # bytes 152-155 of IMOD headers; bit 0 of the flags after it: signed bytes
_VOLUME_STACK = range(401, 631)  # space groups of a stack of volumes (4D)
_MAX_EXTENDED = 1 << 28


def _mrcfile():
    return require("mrcfile", "MRC")


class MrcReader(RegionReader):
    """Regions of an MRC file's data: a memory map (local) or ranged reads (URL)."""

    kind = "mrc"

    def __init__(self, location: str, offset: int, stored_shape, stored_dtype, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.file, self.offset = location, int(offset)
        self.stored_shape = tuple(int(s) for s in stored_shape)
        self.stored_dtype = np.dtype(stored_dtype)

    def location(self) -> tuple:
        return (self.file, self.offset, self.stored_shape, self.stored_dtype.str)

    def open(self):
        if is_url(self.file):
            return fsspec.open(self.file, "rb").open()
        return np.memmap(
            str(local_path(self.file)), dtype=self.stored_dtype, mode="r", offset=self.offset, shape=self.stored_shape
        )

    def read(self, handle, selection: tuple) -> np.ndarray:
        if isinstance(handle, np.memmap):
            return np.array(handle[selection])
        return self._read_ranges(handle, selection)

    def _read_ranges(self, handle, selection: tuple) -> np.ndarray:
        """``selection`` of a remote file: whole rows of each z-slice, one range each."""
        if len(self.stored_shape) == 2:
            selection = (0, *selection)
        shape = self.stored_shape if len(self.stored_shape) == 3 else (1, *self.stored_shape)
        box = [(s, s + 1) if isinstance(s, int) else (s.start, s.stop) for s in selection]
        (z0, z1), (y0, y1), (x0, x1) = box
        row = shape[2] * self.stored_dtype.itemsize
        out = np.empty((z1 - z0, y1 - y0, shape[2]), self.stored_dtype)
        for k, z in enumerate(range(z0, z1)):
            handle.seek(self.offset + (z * shape[1] + y0) * row)
            data = handle.read((y1 - y0) * row)
            if len(data) != (y1 - y0) * row:
                raise EOFError(f"z-slice {z} ends early: the file is shorter than its header says")
            out[k] = np.frombuffer(data, self.stored_dtype).reshape(y1 - y0, shape[2])
        out = out[:, :, x0:x1]
        squeeze = tuple(0 if isinstance(s, int) else slice(None) for s in selection)
        return out[squeeze]


def _header_bytes(location: str) -> tuple[bytes, int]:
    """The header and extended header bytes, and the file's size."""
    if is_url(location):
        fs, _, paths = fsspec.get_fs_token_paths(location)
        size = int(fs.size(paths[0]))
        with fs.open(paths[0], "rb") as handle:
            head = handle.read(1024)
            nsymbt = _nsymbt(head)
            return head + handle.read(nsymbt), size
    local = local_path(location)
    size = local.stat().st_size
    with local.open("rb") as handle:
        head = handle.read(1024)
        return head + handle.read(_nsymbt(head)), size


def _nsymbt(head: bytes) -> int:
    """The extended header's length (bytes 92-95), in the byte order of the machine stamp."""
    if len(head) < 1024:
        return 0
    order = ">" if head[212] == 0x11 else "<"
    value = struct.unpack(f"{order}i", head[92:96])[0]
    return value if 0 <= value <= _MAX_EXTENDED else 0


def open_mrc(path: str, level: int = 0) -> RawImage:
    """The MRC file at ``path`` (one level only), as it is."""
    mrcfile = _mrcfile()
    location = container(path)
    if not exists(location):
        raise InputError(f"{location} does not exist; check the path")
    if level != 0:
        raise InputError(f"{path} has one level (0) only; level {level} does not exist")
    wrong = f"{location} has a wrong MRC header"
    raw, size = _header_bytes(location)
    try:
        mrc = mrcfile.mrcinterpreter.MrcInterpreter(io.BytesIO(raw), permissive=False, header_only=True)
    except Exception as error:
        raise InputError(f"{wrong} ({one_line(error)}); it is no MRC file or it is damaged") from None
    header = mrc.header
    mode = int(header.mode)
    if mode in _REFUSED:
        raise InputError(
            f"{location} is MRC mode {mode}, {_REFUSED[mode]}, not an image; EM input is real-valued: "
            "give the real-space map (modes 0, 1, 2, 6 or 12)"
        )
    if mode not in _MODES:
        raise InputError(f"{wrong} (mode {mode} is no MRC mode); it is damaged or not an MRC file")
    order = header.mode.dtype.byteorder
    dtype = np.dtype(_MODES[mode]).newbyteorder(order if order in "<>" else "=")
    if mode == 0 and _imod_unsigned(raw):
        dtype = np.dtype("uint8")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    maps = (int(header.maps), int(header.mapr), int(header.mapc))  # stored axes: sections, rows, columns
    if min(nx, ny, nz) < 1 or sorted(maps) != [1, 2, 3]:
        raise InputError(
            f"{wrong} (nx, ny, nz = {nx}, {ny}, {nz}; mapc, mapr, maps = {maps[2]}, {maps[1]}, {maps[0]}); "
            "it is damaged or not an MRC file"
        )
    offset = 1024 + int(header.nsymbt)
    expected = offset + nx * ny * nz * dtype.itemsize
    if size != expected:
        raise InputError(
            f"{wrong}: it declares {nx}x{ny}x{nz} voxels of mode {mode} ({expected} bytes with the "
            f"headers), the file has {size} bytes; it is truncated or its header is wrong"
        )
    stored = (nz, ny, nx)
    physical = [3 - m for m in maps]  # stored axis -> zyx axis (Z 0, Y 1, X 2)
    perm = [physical.index(axis) for axis in range(3)]
    shape = [stored[i] for i in perm]
    sizes_xyz = [float(v) for v in (mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z)]
    voxel: list[float | None] = [v * 0.1 if v > 0 else None for v in reversed(sizes_xyz)]
    origin = [float(v) * 0.1 for v in (header.origin.z, header.origin.y, header.origin.x)]
    if not any(origin):
        starts_stored = (int(header.nzstart), int(header.nystart), int(header.nxstart))
        starts = [starts_stored[i] for i in perm]
        origin = [s * v if v is not None else float(s) for s, v in zip(starts, voxel, strict=True)]
    problem = None
    if int(header.ispg) in _VOLUME_STACK:
        problem = f"{path} is a stack of volumes (space group {int(header.ispg)}); split it into one volume per file first"
    fixed: dict[int, int] = {}
    if nz == 1 and problem is None:  # one image: yx
        fixed, perm = {physical.index(0): 0}, [physical.index(1), physical.index(2)]
        shape, voxel, origin = [stored[i] for i in perm], voxel[1:], origin[1:]
    chunks = dask_chunks(shape, None, dtype.itemsize)
    reader = MrcReader(location, offset, stored, dtype, location, shape, dtype, chunks, file_identity(location),
                       perm=perm, fixed=fixed)  # fmt: skip
    details = {"mode": f"{mode} ({dtype.name})", "space group": int(header.ispg)}
    if maps != (3, 2, 1):
        details["axis order (mapc, mapr, maps)"] = (maps[2], maps[1], maps[0])
    axes = "zyx"[-len(shape) :]
    why = "its header has cell size 0 (cella)" if any(v is None for v in voxel) else ""
    return RawImage(reader.to_dask(), axes, voxel, origin, problem, why, "MRC", details, None)


def _imod_unsigned(raw: bytes) -> bool:
    """Mode-0 bytes are unsigned in an IMOD file whose flags do not say they are signed."""
    order = ">" if raw[212] == 0x11 else "<"
    stamp, flags = struct.unpack(f"{order}ii", raw[152:160])
    return stamp == _IMOD_STAMP and not flags & 1
