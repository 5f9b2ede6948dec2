"""Pure torch: networks, diffusion objective, samplers, variants, checkpoints, reference import,
the one intensity normalisation. Never imports Dask, Zarr, ``emdiffuse.io`` or
``emdiffuse.pipeline``: a model is a torch module plus a sampler, usable on a numpy tile.

- ``variants`` (:class:`ModelConfig`, the four variants, size presets), ``config_fields``
  (checks and JSON of its fields), ``unet`` and ``layers`` (the network), ``conditioning``
  (a super-resolution input on the output grid);
- ``diffusion`` (schedules, prediction targets, the training loss, the denoiser),
  ``ema`` (the moving average of the weights), ``samplers`` and ``sampler_names`` (the
  samplers, and their torch-free list);
- ``enhancer`` (a loaded model enhancing numpy tiles), ``normalization`` (raw <-> model
  space), ``device`` (the device resolver);
- ``checkpoints`` and ``torch_files`` (safe loading and saving), ``reference`` and
  ``reference_config`` (importing the reference EMDiffuse's weights and configs).
"""
