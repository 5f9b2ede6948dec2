"""The residual correlation ρ the blend of a run uses: calibrated, or measured before the run.

Overlapping tiles draw their residual texture from independent noise but from the same
content, so their residuals correlate; the variance-aware blend (:mod:`~emdiffuse.pipeline.blend`)
needs that correlation to keep the texture's variance in overlaps. How much the residuals
correlate depends on how they are sampled: the demo's denoiser gave ρ ≈ 0.29 with
``dpmpp_2m`` at 8 ``logsnr`` steps, 0.46 at 4, 0.42 with ``ddim`` and 0.03 from a
truncated start at σ 1.5 (``start_noise``: the texture then comes mostly from the noise).

So a model's calibration record (``residual_correlation``, measured at the end of training)
holds only for the sampler, steps and spacing it was measured with
(:func:`calibrated_correlation`). A run that samples otherwise, or a model without that record,
measures ρ on its own input before anything is written (:func:`measure_correlation`): the
:data:`PILOT_TILES` lattice tiles nearest the volume's centre, :data:`PILOT_SAMPLES` samples
each, one tile at a time, with the run's own sampler, seed and tile noise — so the value
depends on neither the chunking nor the batch size, and the run record keeps it (a resumed
run blends with the value its first part used).

The calibrated intervals have the same limit: their scale was fitted on the spread of samples
drawn the calibration's way, and other sampling spreads otherwise — at 4 steps or with
``ddim`` the demo's samples spread 0.67-0.70× as much while the error of their mean hardly
moves, so the intervals covered 84 % where 90 % was meant
(``benchmarks/results/interval_coverage.md``). The same pilot tiles therefore also draw
samples the calibration's way, and the half-widths of a run that samples otherwise are
multiplied by the ratio of the two spreads (:func:`spread_ratio`, RMS over the pilot's
voxels): the run's intervals are as wide as the calibrated sampling's would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from emdiffuse.models.calibration import fitted_sampling, residual_correlation
from emdiffuse.models.sampler_names import network_evaluations
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.lattice import Lattice, Tile
from emdiffuse.pipeline.settings import RunSettings, RunSpec
from emdiffuse.pipeline.tasks import condition_region, run_tiles

PILOT_TILES = 2
PILOT_SAMPLES = 2


def samples_as_fitted(calibration: Mapping[str, Any], settings: RunSettings) -> bool:
    """Whether the run draws full samples with the sampler, steps and spacing the
    calibration was fitted on (:func:`emdiffuse.models.calibration.fitted_sampling`)."""
    sampling = (settings.sampler, int(settings.steps), settings.spacing)
    return settings.start_noise is None and sampling == fitted_sampling(calibration)


def calibrated_correlation(calibration: Mapping[str, Any] | None, settings: RunSettings) -> float | None:
    """The correlation the model's calibration measured, when the run samples as the
    calibration did (:func:`samples_as_fitted`); None when it is unknown for these settings
    (another sampler, steps or spacing, a truncated start, no record). A record without
    ``sampler``/``steps`` was measured at the run defaults (as training measures it), and
    without ``spacing`` at the sampler's default spacing."""
    if not calibration or "residual_correlation" not in calibration:
        return None
    if not samples_as_fitted(calibration, settings):
        return None
    return float(calibration["residual_correlation"])


def calibrated_ratio(calibration: Mapping[str, Any] | None, settings: RunSettings) -> float | None:
    """The calibrated half-widths' factor when it needs no measurement: 1.0 when the run
    writes no calibrated intervals (no record, fewer than 2 samples) or samples as the
    calibration was fitted (:func:`samples_as_fitted`); None otherwise."""
    if not calibration or settings.samples < 2 or samples_as_fitted(calibration, settings):
        return 1.0
    return None


def pilot_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations of one pilot sampling: :data:`PILOT_SAMPLES` samples (and the
    model's mean) of each of the :data:`PILOT_TILES` tiles."""
    return PILOT_TILES * (PILOT_SAMPLES * network_evaluations(sampler, steps) + 1)


def needs_pilot(spec: RunSpec) -> bool:
    """Whether ``spec`` still lacks its residual correlation or its interval ratio."""
    return spec.residual_correlation is None or spec.interval_ratio is None


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


def _pilot_parts(specs: list[RunSpec], enhancer) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of ``specs`` (the same run, sampled otherwise), (samples, residual parts)
    of :data:`PILOT_SAMPLES` samples of each :func:`pilot_tiles` tile, ``(PILOT_SAMPLES,
    voxels)`` each, model space: one tile per batch, the run's seed and tile noise; each
    tile's input is read once for all of them."""
    pilots = [replace(s, settings=replace(s.settings, samples=PILOT_SAMPLES, batch_size=1))
              for s in specs]  # fmt: skip
    lattice = specs[0].lattice
    parts_of = [([[] for _ in range(PILOT_SAMPLES)], [[] for _ in range(PILOT_SAMPLES)])
                for _ in specs]  # fmt: skip
    for tile in pilot_tiles(lattice):
        box = lattice.input_box_of([tile])
        region = condition_region(specs[0], runtime.read_input(specs[0], box))
        for pilot, (samples, residuals) in zip(pilots, parts_of, strict=True):
            for parts in run_tiles(pilot, enhancer, [tile], region, box):
                rest = parts.residual if parts.residual is not None else np.zeros_like(parts.mean)
                samples[parts.sample].append((parts.mean + rest).ravel())
                residuals[parts.sample].append(rest.ravel())
    return [(np.stack([np.concatenate(t) for t in samples]),
             np.stack([np.concatenate(t) for t in residuals])) for samples, residuals in parts_of]  # fmt: skip


def spread_ratio(calibrated: np.ndarray, run: np.ndarray) -> float:
    """RMS spread over samples of ``calibrated`` (samples drawn the calibration's way) over
    that of ``run`` (this run's sampling), both ``(N, voxels)`` of the same tiles and N:
    the factor that makes the run's calibrated half-widths as wide as the calibrated
    sampling's. 1.0 where the run's samples do not spread."""
    spread_run = float(np.var(run, axis=0).mean())
    if spread_run <= 0.0:
        return 1.0
    return float(np.sqrt(np.var(calibrated, axis=0).mean() / spread_run))


def measure_pilot(spec: RunSpec, enhancer=None) -> dict[str, float]:
    """What ``spec``'s run needs measured on its own input, from :data:`PILOT_SAMPLES`
    samples of each :func:`pilot_tiles` tile (one tile per batch, the run's seed and tile
    noise): ``residual_correlation`` when ``spec`` lacks it (the residual parts'
    correlation, :func:`emdiffuse.models.calibration.residual_correlation`; 0 when they
    are zero) and ``interval_ratio`` when ``spec`` lacks it (:func:`spread_ratio` against
    samples of the same tiles drawn as the calibration was fitted). ``enhancer`` defaults
    to the run's (:func:`emdiffuse.pipeline.runtime.spec_enhancer`)."""
    if enhancer is None:
        enhancer = runtime.spec_enhancer(spec)
    specs = [spec]
    if spec.interval_ratio is None:  # also samples drawn as the calibration was fitted
        sampler, steps, spacing = fitted_sampling(spec.calibration)
        fitted = replace(spec.settings, sampler=sampler, steps=steps, spacing=spacing,
                         start_noise=None)  # fmt: skip
        specs.append(replace(spec, settings=fitted))
    measured = _pilot_parts(specs, enhancer)
    samples, residuals = measured[0]
    out: dict[str, float] = {}
    if spec.residual_correlation is None:
        out["residual_correlation"] = residual_correlation(residuals)
    if spec.interval_ratio is None:
        out["interval_ratio"] = spread_ratio(measured[1][0], samples)
    return out


def measure_correlation(spec: RunSpec, enhancer=None) -> float:
    """ρ of ``spec``'s sampling on its own input (:func:`measure_pilot`)."""
    only_rho = replace(spec, residual_correlation=None, interval_ratio=1.0)
    return measure_pilot(only_rho, enhancer)["residual_correlation"]


def with_correlation(spec: RunSpec, client=None, enhancer=None) -> RunSpec:
    """``spec`` with its residual correlation and interval ratio known: as they are when
    the model's calibration gave them (or the run needs none), else measured
    (:func:`measure_pilot`) — on a worker of ``client`` when given, where the run's
    tasks will load the model, else in this process (with ``enhancer`` when given)."""
    if not needs_pilot(spec):
        return spec
    if client is not None:
        values = client.submit(measure_pilot, spec, pure=False).result()
    else:
        values = measure_pilot(spec, enhancer)
    if "residual_correlation" in values:
        spec = replace(spec, residual_correlation=float(values["residual_correlation"]),
                       correlation_source="this run's measurement")  # fmt: skip
    if "interval_ratio" in values:
        spec = replace(spec, interval_ratio=float(values["interval_ratio"]))
    return spec


__all__ = [
    "PILOT_TILES", "PILOT_SAMPLES", "samples_as_fitted", "calibrated_correlation", "calibrated_ratio",
    "pilot_evaluations", "needs_pilot", "pilot_tiles", "spread_ratio", "measure_pilot", "measure_correlation", "with_correlation",
]  # fmt: skip
