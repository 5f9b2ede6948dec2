"""What a file holds before it is checked as a volume, and the units its metadata uses.

The readers (:mod:`~emdiffuse.io.ome_zarr`, :mod:`~emdiffuse.io.tiff`,
:mod:`~emdiffuse.io.hdf5`, :mod:`~emdiffuse.io.n5`, :mod:`~emdiffuse.io.precomputed`,
:mod:`~emdiffuse.io.mrc`) return a :class:`RawImage`; :mod:`~emdiffuse.io.volume` checks it into a zyx / yx
:class:`~emdiffuse.io.volume.Volume` and ``emdiffuse info`` shows it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask.array as da
import numpy as np

from emdiffuse.errors import InputError

_UNIT_TO_NM = {
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1000.0,
    "micron": 1000.0,
    "um": 1000.0,
    "µm": 1000.0,  # micro sign
    "μm": 1000.0,  # greek mu
    "angstrom": 0.1,
    "å": 0.1,
    "picometer": 1e-3,
    "pm": 1e-3,
    "millimeter": 1e6,
    "mm": 1e6,
    "centimeter": 1e7,
    "cm": 1e7,
    "meter": 1e9,
    "m": 1e9,
    "inch": 2.54e7,
}
SPATIAL_AXES = {2: "yx", 3: "zyx"}


def nm_per_unit(unit) -> float | None:
    """Nanometres per ``unit`` (NGFF, OME and ImageJ spellings); None: absent or unknown."""
    if not unit:
        return None
    text = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    return _UNIT_TO_NM.get(text)


@dataclass
class RawImage:
    """What a file holds, before it is checked as a zyx / yx volume (``info`` shows it all).

    ``voxel`` and ``offset`` run along the spatial axes (zyx or yx); an unknown voxel size is
    None, and then its offset is in voxels. ``problem`` says why the image cannot be a volume
    (colour, a channel axis); ``data`` then keeps every axis. ``format`` names the format,
    ``details`` are what ``info`` shows of it (dataset, encoding, mode, ...) and ``levels``
    the scale levels of a multiscale input (``{"level", "shape", "voxel_size_nm"}`` each;
    None: the reader does not list them).
    """

    data: da.Array
    axes: str
    voxel: list[float | None]
    offset: list[float]
    problem: str | None = None
    unknown_why: str = ""
    format: str = ""
    details: dict = field(default_factory=dict)
    levels: list[dict] | None = None


def check_dtype(dtype: np.dtype, path: str) -> None:
    """Refuse a dtype that is not an image intensity (complex, bool, object, strings)."""
    if dtype.kind in "cbOSUV":
        raise InputError(
            f"{path} has dtype {dtype}, which is not an image intensity type; "
            "convert it to uint8, uint16 or float32"
        )
