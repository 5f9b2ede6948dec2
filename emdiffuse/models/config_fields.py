"""Checks and JSON forms of :class:`~emdiffuse.models.variants.ModelConfig`'s fields: the
noise schedule, the normalisations, the calibration, the UNet architecture and its index
embedding."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from emdiffuse.errors import InputError
from emdiffuse.models.unet import UNetConfig

SCHEDULE_KINDS = ("linear", "cosine")


def index_classes(unet: UNetConfig) -> int:
    """How many index embeddings the UNet has (0 = none)."""
    for name in ("num_indices", "num_classes", "n_index", "index_classes"):
        value = getattr(unet, name, None)
        if value is not None:
            return int(value)
    return 0


def index_field() -> str:
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    for name in ("num_indices", "num_classes", "n_index", "index_classes"):
        if name in names:
            return name
    raise RuntimeError("UNetConfig has no index-embedding field")


def unet_from_dict(data: Any) -> UNetConfig:
    if isinstance(data, UNetConfig):
        return data
    if not isinstance(data, Mapping):
        raise InputError("model config: field 'unet' must be a JSON object")
    names = {f.name: f for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"model config: unknown unet field(s) {', '.join(unknown)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return UNetConfig(**kwargs)
    except TypeError as error:
        raise InputError(f"model config: bad 'unet' field ({error})") from None


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def check_schedule(schedule: Any, name: str = "schedule") -> None:
    """Raise :class:`InputError` unless ``schedule`` is a valid noise schedule object
    (``name`` is the config field the messages name: ``schedule`` or ``inference_schedule``)."""
    if not isinstance(schedule, Mapping):
        raise InputError(f"model config: field {name!r} must be an object")
    kind = schedule.get("kind")
    if kind not in SCHEDULE_KINDS:
        raise InputError(
            f"model config: {name}.kind {kind!r} unknown; choose one of "
            f"{', '.join(SCHEDULE_KINDS)}"
        )
    steps = schedule.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise InputError(f"model config: {name}.steps {steps!r} must be an integer >= 2")
    if kind == "linear":
        lo, hi = schedule.get("beta_start"), schedule.get("beta_end")
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi < 1):
            raise InputError(
                f"model config: linear {name} needs 0 < beta_start < beta_end < 1, "
                f"got {lo!r}, {hi!r}"
            )


def describe_schedule(schedule: Mapping[str, Any]) -> str:
    """One line for a schedule object, e.g. ``linear, 1000 steps, beta 0.0001..0.09``."""
    text = f"{schedule.get('kind')}, {schedule.get('steps')} steps"
    if schedule.get("kind") == "linear":
        return f"{text}, beta {schedule.get('beta_start'):g}..{schedule.get('beta_end'):g}"
    return f"{text}, s {schedule.get('s', 0.008):g}"


def check_normalization(norm: Any, name: str = "normalization") -> None:
    if not isinstance(norm, Mapping) or set(norm) != {"low", "high"}:
        raise InputError(f'model config: field {name!r} must be {{"low": float, "high": float}}')
    lo, hi = norm["low"], norm["high"]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)) or hi <= lo:
        raise InputError(
            f"model config: {name} low={lo!r}, high={hi!r} must be finite with low < high"
        )


def check_calibration(calibration: Any) -> None:
    """The stored conformal calibration (:mod:`emdiffuse.models.calibration`): ``level`` in
    (0, 1), ``scale`` >= 0, ``samples`` >= 2, ``floor`` > 0, ``residual_correlation`` (when
    present) in [0, 1], ``mean_interval`` (when present: the error head's, an object with its
    own ``level``, ``scale`` and ``floor``); ``scales`` (when present, in either) a list of
    ``[level, scale]`` pairs; other keys are informational."""
    if not isinstance(calibration, Mapping):
        raise InputError("model config: field 'calibration' must be an object or null")
    _check_interval(calibration, "calibration", ("level", "scale", "samples", "floor"))
    samples = calibration["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise InputError(f"model config: calibration.samples {samples!r} must be an integer >= 2")
    if "residual_correlation" in calibration and not 0 <= _number(
        calibration, "residual_correlation", "calibration"
    ) <= 1:
        raise InputError("model config: calibration.residual_correlation must be in [0, 1]")
    if "mean_interval" in calibration:
        interval = calibration["mean_interval"]
        if not isinstance(interval, Mapping):
            raise InputError("model config: calibration.mean_interval must be an object")
        _check_interval(interval, "calibration.mean_interval", ("level", "scale", "floor"))


# what a fitted step schedule record holds (ModelConfig.step_schedules)
_STEP_RECORD_KEYS = {"sampler", "reference_steps", "patches", "schedules"}
_STEP_SCHEDULE_KEYS = {"sigmas", "rms", "rms_logsnr"}


def check_step_schedules(record: Any) -> None:
    """A model's fitted few-step schedules (:mod:`emdiffuse.models.step_fit`): ``sampler``,
    ``reference_steps``, ``patches`` and ``schedules``, mapping each step count to its
    ``sigmas`` (that many, positive, strictly decreasing), ``rms`` and ``rms_logsnr``."""
    if not isinstance(record, Mapping) or set(record) != _STEP_RECORD_KEYS:
        raise InputError(f"model config: step_schedules needs {sorted(_STEP_RECORD_KEYS)}")
    schedules = record["schedules"]
    if not isinstance(schedules, Mapping) or not schedules:
        raise InputError("model config: step_schedules.schedules must map step counts to sigmas")
    for steps, entry in schedules.items():
        where = f"model config: step_schedules.schedules[{steps!r}]"
        if not str(steps).isdigit() or int(steps) < 1:
            raise InputError(f"{where}: the key must be a step count")
        if not isinstance(entry, Mapping) or set(entry) != _STEP_SCHEDULE_KEYS:
            raise InputError(f"{where} needs {sorted(_STEP_SCHEDULE_KEYS)}")
        try:
            sigmas = [float(s) for s in entry["sigmas"]]
        except (TypeError, ValueError):
            sigmas = []
        ordered = all(sigmas[i + 1] < sigmas[i] for i in range(len(sigmas) - 1))
        if len(sigmas) != int(steps) or not ordered or not all(
            math.isfinite(s) and s > 0 for s in sigmas
        ):
            raise InputError(f"{where} needs {steps} positive, strictly decreasing sigmas")


def _check_interval(record: Mapping, where: str, required: tuple[str, ...]) -> None:
    """``required`` keys present, ``level`` in (0, 1), ``scale`` >= 0, ``floor`` > 0."""
    missing = sorted(set(required) - set(record))
    if missing:
        raise InputError(f"model config: {where} lacks {', '.join(missing)}")
    if not 0 < _number(record, "level", where) < 1:
        raise InputError(f"model config: {where}.level {record['level']!r} must be in (0, 1)")
    if _number(record, "scale", where) < 0 or _number(record, "floor", where) <= 0:
        raise InputError(f"model config: {where}.scale must be >= 0 and floor > 0")
    for pair in record.get("scales") or ():
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in pair
        )
        if not ok or not 0 < pair[0] < 1 or pair[1] < 0:
            raise InputError(
                f"model config: {where}.scales must be [level, scale] pairs with level in "
                f"(0, 1) and scale >= 0, got {pair!r}"
            )


def _number(record: Mapping, key: str, where: str) -> float:
    """``record[key]`` as a finite number (``where``: the record's name, for the error)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"model config: {where}.{key} must be a finite number, got {value!r}")
    return float(value)


__all__ = [
    "SCHEDULE_KINDS", "index_classes", "index_field", "unet_from_dict", "jsonable",
    "check_schedule", "describe_schedule", "check_normalization", "check_calibration",
    "check_step_schedules",
]  # fmt: skip
