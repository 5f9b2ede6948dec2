"""The local neuroglancer server: serves OME-Zarr read-only with the bundled client."""
