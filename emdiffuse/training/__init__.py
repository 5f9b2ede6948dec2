"""Training: from raw volumes to a checkpoint.

- data: ``synthetic`` and ``synthetic_fields`` (the synthetic EM generator), ``degrade``
  (each task's degraded input), ``registration`` (aligning raw pairs before training);
- patches: ``chunks`` (reading sources chunk by chunk), ``recipes`` (what each task reads,
  the train/validation split), ``augment``, ``loader`` (:class:`PatchDataset`);
- the run: ``settings`` (:class:`TrainSettings`, every default), ``build`` (dataset, config,
  network), ``step`` (one optimisation step, keyed noise), ``trainer`` (``train()``: the
  loop), ``state`` (checkpoints, resume), ``validation``, ``scalars``, ``distributed`` (DDP);
- ``demo_model``: the demo's small denoiser.
"""
