"""The images a run writes: created empty before the first chunk (the mean, and the
``uncertainty`` child image when ``samples >= 2``, or for the mean alone from a model with a
calibrated error head), finished with their pyramids and metadata after the last.

The uncertainty image's ``emdiffuse`` attributes say what it holds
(:func:`uncertainty_attributes`): ``{"uncertainty": "half-width", "level": 0.9, "samples":
N, "calibrated_sampler", "calibrated_steps", "calibrated_spacing"[, "calibrated_along"][,
"spread_ratio"]}`` — half-widths of per-voxel intervals ``output ± half-width`` at that
level, from a model that stores a calibration (fitted on samples of that sampling; for
vEMDiffuse-a along the lateral axis ``calibrated_along``, the harder of y and x; a run that
samples otherwise has its spread multiplied by ``spread_ratio``, measured before the run) —
or ``{"uncertainty": "std", "samples": N}``, the standard deviation over the N samples (not
calibrated). The mean alone (``samples=0``) of a model
with an error head writes ``{"uncertainty": "half-width", "level": 0.9, "samples": 0,
"source": "error head"[, "calibrated_along"]}``: intervals ``output ± half-width`` from the
head's σ of the mean's error, scaled by a conformal factor fitted at the end of training
(:func:`emdiffuse.models.calibration.fit_mean`). All in the output's intensity units.
"""

from __future__ import annotations

from emdiffuse.io import create_image, finalize_image
from emdiffuse.models.calibration import fitted_sampling
from emdiffuse.pipeline.settings import RunSpec


def create_outputs(spec: RunSpec, *, overwrite: bool) -> None:
    """Create the run's output image(s) for region writes. With ``overwrite`` the earlier
    image goes first, run record included (only an image emdiffuse wrote)."""
    shape = spec.image_shape(spec.lattice.output_shape)
    chunks = spec.image_shape(spec.chunks)
    geometry = dict(
        voxel_size=spec.output_voxel_size,
        axes=spec.output_axes,
        translation=spec.output_translation,
    )
    create_image(
        spec.output_path,
        shape=shape,
        dtype=spec.settings.dtype,
        chunks=chunks,
        overwrite=overwrite,
        **geometry,
    )
    if spec.writes_uncertainty:
        create_image(
            spec.uncertainty_path,
            shape=shape,
            dtype="float32",
            chunks=chunks,
            overwrite=True,
            name="uncertainty",
            attributes=uncertainty_attributes(spec),
            **geometry,
        )


def uncertainty_attributes(spec: RunSpec) -> dict:
    """What the uncertainty image of ``spec``'s run holds (its ``emdiffuse`` attributes)."""
    samples = int(spec.settings.samples)
    calibration = spec.calibration
    if calibration is None:
        return {"uncertainty": "std", "samples": samples}
    if spec.mean_uncertainty:
        record = calibration["mean_interval"]
        return {
            "uncertainty": "half-width",
            "level": float(record["level"]),
            "samples": 0,
            "source": "error head",  # the mean's own error σ, no samples
            **({"calibrated_along": str(record["axis"])} if record.get("axis") else {}),
        }
    sampler, steps, spacing = fitted_sampling(calibration)
    return {
        "uncertainty": "half-width",
        "level": float(calibration["level"]),
        "samples": samples,
        "calibrated_samples": int(calibration["samples"]),
        "calibrated_sampler": sampler,  # the sampling the calibration was fitted on
        "calibrated_steps": steps,
        "calibrated_spacing": spacing,
        # vEMDiffuse-a: the lateral axis whose patches set the scale (the harder one)
        **({"calibrated_along": str(calibration["axis"])} if calibration.get("axis") else {}),
        # another sampling's spread rescaled to the calibrated one's (pipeline.correlation)
        **({} if spec.interval_ratio in (None, 1.0) else {"spread_ratio": float(spec.interval_ratio)}),
    }


def finalize_outputs(spec: RunSpec) -> None:
    """Build the pyramids and write the metadata of the run's output image(s)."""
    geometry = dict(
        voxel_size=spec.output_voxel_size,
        axes=spec.output_axes,
        translation=spec.output_translation,
    )
    finalize_image(spec.output_path, **geometry)
    if spec.writes_uncertainty:
        finalize_image(spec.uncertainty_path, **geometry)
