"""Pure torch: networks, diffusion objective, samplers, variants, checkpoints. Never imports Dask or Zarr."""
