"""The residual correlation ρ the blend of a run uses: calibrated, or measured before the run.

Overlapping tiles draw their residual texture from independent noise but from the same
content, so their residuals correlate; the variance-aware blend (:mod:`~emdiffuse.pipeline.blend`)
needs that correlation to keep the texture's variance in overlaps. How much the residuals
correlate depends on how they are sampled: the demo's denoiser gives ρ ≈ 0.29 with the
default ``dpmpp_2m`` at 8 steps, 0.46 at 4 steps, 0.42 with ``ddim`` and 0.03 from a
truncated start at σ 1.5 (``start_noise``: the texture then comes mostly from the noise).

So a model's calibration record (``residual_correlation``, measured at the end of training)
holds only for the sampler, steps and spacing it was measured with
(:func:`calibrated_correlation`). A run that samples otherwise, or a model without that record,
measures ρ on its own input before anything is written (:func:`measure_correlation`): the
:data:`PILOT_TILES` lattice tiles nearest the volume's centre, :data:`PILOT_SAMPLES` samples
each, one tile at a time, with the run's own sampler, seed and tile noise — so the value
depends on neither the chunking nor the batch size, and the run record keeps it (a resumed
run blends with the value its first part used).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from emdiffuse.models.calibration import fitted_sampling, residual_correlation
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.lattice import Lattice, Tile
from emdiffuse.pipeline.settings import RunSettings, RunSpec
from emdiffuse.pipeline.tasks import condition_region, run_tiles

PILOT_TILES = 2
PILOT_SAMPLES = 2


def calibrated_correlation(calibration: Mapping[str, Any] | None, settings: RunSettings) -> float | None:
    """The correlation the model's calibration measured, when the run samples as the
    calibration did (sampler, steps and spacing, full samples); None when it is unknown for
    these settings (another sampler, steps or spacing, a truncated start, no record). A
    record without ``sampler``/``steps`` was measured at the run defaults (as training
    measures it), and without ``spacing`` at the sampler's default spacing."""
    if not calibration or "residual_correlation" not in calibration:
        return None
    measured_at = fitted_sampling(calibration)
    if settings.start_noise is not None:
        return None
    if (settings.sampler, int(settings.steps), settings.spacing) != measured_at:
        return None
    return float(calibration["residual_correlation"])


def pilot_tiles(lattice: Lattice, count: int = PILOT_TILES) -> list[Tile]:
    """The ``count`` tiles of ``lattice`` whose output boxes lie nearest the volume's centre
    (ties in lattice order): content away from the volume's borders, fixed by the lattice
    alone."""
    centre = np.asarray(lattice.output_shape, dtype=np.float64) / 2.0
    near = [
        range(max(0, c // 2 - 1), min(n, c // 2 + 2))
        for c, n in ((lattice.n_units,) * 2, (len(lattice.y),) * 2, (len(lattice.x),) * 2)
    ]
    candidates = [Tile(u, iy, ix) for u in near[0] for iy in near[1] for ix in near[2]]

    def distance(tile: Tile) -> float:
        box = lattice.tile_output_box(tile)
        middle = np.array([(a + b) / 2.0 for a, b in box])
        return float(np.sum((middle - centre) ** 2))

    return sorted(candidates, key=lambda t: (distance(t), t.unit, t.iy, t.ix))[:count]


def measure_correlation(spec: RunSpec, enhancer=None) -> float:
    """ρ of ``spec``'s sampling on its own input: :data:`PILOT_SAMPLES` samples of each
    :func:`pilot_tiles` tile (one tile per batch, the run's seed and tile noise), their
    residual parts' correlation (:func:`emdiffuse.models.calibration.residual_correlation`;
    0 when the residuals are zero). ``enhancer`` defaults to the run's
    (:func:`emdiffuse.pipeline.runtime.spec_enhancer`)."""
    if enhancer is None:
        enhancer = runtime.spec_enhancer(spec)
    pilot = replace(spec, settings=replace(spec.settings, samples=PILOT_SAMPLES, batch_size=1))
    lattice = spec.lattice
    per_sample: list[list[np.ndarray]] = [[] for _ in range(PILOT_SAMPLES)]
    for tile in pilot_tiles(lattice):
        box = lattice.input_box_of([tile])
        region = condition_region(spec, runtime.read_input(spec, box))
        for parts in run_tiles(pilot, enhancer, [tile], region, box):
            rest = parts.residual if parts.residual is not None else np.zeros_like(parts.mean)
            per_sample[parts.sample].append(rest)
    residuals = np.stack([np.concatenate(tiles) for tiles in per_sample])
    return residual_correlation(residuals)


def with_correlation(spec: RunSpec, client=None, enhancer=None) -> RunSpec:
    """``spec`` with its residual correlation known: as it is when the model's calibration
    gave it (or the run has no residual texture), else measured
    (:func:`measure_correlation`) — on a worker of ``client`` when given, where the run's
    tasks will load the model, else in this process (with ``enhancer`` when given)."""
    if spec.residual_correlation is not None:
        return spec
    if client is not None:
        value = client.submit(measure_correlation, spec, pure=False).result()
    else:
        value = measure_correlation(spec, enhancer)
    return replace(
        spec, residual_correlation=float(value), correlation_source="this run's measurement"
    )


__all__ = [
    "PILOT_TILES", "PILOT_SAMPLES", "calibrated_correlation", "pilot_tiles",
    "measure_correlation", "with_correlation",
]  # fmt: skip
