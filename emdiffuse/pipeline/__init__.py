"""Chunked pipeline: OME-Zarr I/O, tile lattice, blending, Dask graph, training loader."""
