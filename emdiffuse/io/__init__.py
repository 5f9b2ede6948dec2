"""Volumes in and out: OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3) and TIFF stacks; in
only, with the ``formats`` extra: HDF5, N5, neuroglancer precomputed and MRC.

Everything is lazy (dask arrays). Axis order zyx (2D: yx); voxel sizes and translations in nm.
Written images are OME-Zarr 0.5 (zarr v3): level arrays ``0``, ``1``, ... with a 2x mean
pyramid over the isotropic axes, metadata written last so a crashed write never looks complete.

One job per module:

- :mod:`~emdiffuse.io.volume`: :class:`Volume`, :func:`open_volume` (dispatch to the readers,
  checks), :func:`parse_voxel_size`, :func:`check_finite`, :func:`input_identity`;
- :mod:`~emdiffuse.io.ome_zarr` and :mod:`~emdiffuse.io.tiff`: the readers;
- :mod:`~emdiffuse.io.hdf5` (h5py), :mod:`~emdiffuse.io.n5` and
  :mod:`~emdiffuse.io.precomputed` (tensorstore, over :mod:`~emdiffuse.io.tstore`),
  :mod:`~emdiffuse.io.mrc` (mrcfile): the optional readers, each reading through a picklable
  :class:`~emdiffuse.io.regions.RegionReader` that opens the data in each process;
- :mod:`~emdiffuse.io.damaged`: a damaged chunk named wherever it is read;
- :mod:`~emdiffuse.io.writer`: :func:`create_image`, :func:`finalize_image` (pyramid,
  metadata last), :func:`write_image`;
- :mod:`~emdiffuse.io.output_safety`: :func:`refuse_output`, :func:`remove_output`,
  :func:`make_output_folder`, :func:`written_by_emdiffuse`;
- :mod:`~emdiffuse.io.describe`: :func:`describe` for ``emdiffuse info``;
- :mod:`~emdiffuse.io.image` and :mod:`~emdiffuse.io.paths`: the readers' shared record,
  units, locations and :func:`~emdiffuse.io.paths.input_format`.
"""

from emdiffuse.io.describe import describe
from emdiffuse.io.image import SPATIAL_AXES
from emdiffuse.io.output_safety import (
    OUTPUT_KINDS,
    OUTPUT_MARKER,
    RECORD_DIR,
    make_output_folder,
    refuse_output,
    remove_output,
    written_by_emdiffuse,
)
from emdiffuse.io.volume import (
    FORMATS,
    Volume,
    check_finite,
    input_identity,
    open_volume,
    parse_voxel_size,
)
from emdiffuse.io.writer import create_image, finalize_image, pyramid_factors, write_image

__all__ = [
    "FORMATS",
    "OUTPUT_KINDS",
    "OUTPUT_MARKER",
    "RECORD_DIR",
    "SPATIAL_AXES",
    "Volume",
    "check_finite",
    "create_image",
    "describe",
    "finalize_image",
    "input_identity",
    "make_output_folder",
    "open_volume",
    "parse_voxel_size",
    "pyramid_factors",
    "refuse_output",
    "remove_output",
    "write_image",
    "written_by_emdiffuse",
]
