"""The settings of a training run: :class:`TrainSettings`, the one home of every default.

``train(task, data, out, **settings)`` (:mod:`emdiffuse.training.trainer`), the ``emdiffuse
train`` command (its option defaults are read from here), the demo (:data:`DEMO_SETTINGS`)
and the benchmarks all build one record with :meth:`TrainSettings.build`, which refuses
unknown names, converts numbers and checks the values before anything runs. The record is
stored as ``settings.json`` in the run folder and in every checkpoint; ``--resume`` compares
the :data:`RESUME_FIELDS` of the two.

Torch-free, so the command line can read the defaults without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emdiffuse.errors import InputError
from emdiffuse.models.precision_names import TRAIN_PRECISIONS
from emdiffuse.models.sampler_names import DEFAULT_FIT_STEPS, MAX_FIT_STEPS, check_sampler
from emdiffuse.models.z_context import check_z_context
from emdiffuse.training.augment import DEFAULT_JITTER

TASK_VARIANTS = {
    "denoise": "emdiffuse-n",
    "super-resolve": "emdiffuse-r",
    "isotropic": "vemdiffuse-i",
    "anisotropic": "vemdiffuse-a",
}
# diffusion: the SR3 kind (one diffusion UNet, as the reference); residual: mean plus residual
# (a regression network for the posterior mean and a diffusion UNet for the residual, trained
# together); regression: the diffusion UNet trained as a plain regression (CARE-style baseline)
OBJECTIVES = ("diffusion", "regression", "residual")
# "auto" (the default) resolves before anything runs (build.resolve_objective): residual
# for a new model, the --init model's kind when fine-tuning (reference weights: diffusion),
# the run's own objective when resuming
OBJECTIVE_CHOICES = ("auto", *OBJECTIVES)
LOSS_NAMES = ("mse", "l1")
# how the residual kind's mean network starts (its 1x1 skip from condition to output):
# least-squares: the best per-voxel affine predictor of the training patches (a shrinkage of
# a noisy input, near-interpolation weights for isotropic); input: "output = input" in raw
# units (the noisy / upsampled image, linear interpolation between slices)
MEAN_INITS = ("least-squares", "input")
LR_SCHEDULES = ("constant", "cosine")
AXES = ("y", "x", "both")
# the error head's refit at the end of training: at most this many steps by default
# (training/error_refit.py; a time-limited run's share of its limit usually ends it sooner)
DEFAULT_REFIT_STEPS = 2000
# settings a resumed run must share with the checkpoint it resumes (the architecture's too:
# a different one could not load the saved weights)
RESUME_FIELDS = ("task", "batch_size", "patch", "seed", "prediction", "size", "objective",
                 "unet", "mean_net", "residual_scale", "z_context")  # fmt: skip
# fields only the residual objective reads (validate refuses them for the other objectives)
RESIDUAL_FIELDS = ("mean_net", "residual_scale", "mean_warmup", "residual_batch", "mean_ssim")
# UNet fields the variant decides (channels, dimensionality, index embedding): not overridable
_UNET_FIXED = ("dims", "in_channels", "out_channels", "use_index_embedding", "num_indices")


@dataclass
class TrainSettings:
    """Everything that decides a run (stored in ``settings.json`` and every checkpoint)."""

    task: str
    data: list[str]
    size: str = "tiny"  # model preset: tiny, small, reference
    unet: dict[str, Any] | None = None  # overrides of the preset's UNet fields (channel_mults, …)
    steps: int = 2000
    batch_size: int = 8  # per process: the global batch is batch_size x world size
    patch: int = 64  # side on the output grid
    lr: float = 2e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # or "cosine" (to lr * min_lr_ratio at `steps`)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    prediction: str = "v"
    loss: str = "mse"
    sampler: str = "ddim"  # validation sampler
    val_steps: int = 4
    val_every: int = 250
    val_batch: int = 8
    ckpt_every: int = 250
    factor: int | None = None
    axis: str = "both"
    val_fraction: float = 0.1
    region: int | None = None
    workers: int = 0
    seed: int = 0
    # autocast: auto = bf16 where the hardware has it natively (CUDA, CPUs with AMX or AVX512-BF16), else
    # fp32 (models/device.py). Not a resume field: a run may resume on other hardware
    precision: str = "auto"
    init: str | None = None
    voxel_size: list[float] | None = None
    # brightness/contrast augmentation: a detector gain in 1 +- j and offset in +- j/2 of the
    # target's range, one raw-unit change for condition and target (training/augment.py)
    intensity_jitter: float = DEFAULT_JITTER
    # random 90° rotations of square patches in the training augmentation (flips always);
    # False keeps the data's y and x apart (scan directions, FIB milling; training/augment.py)
    rotations: bool = True
    schedule: dict[str, Any] | None = None  # training noise schedule (default: the reference's)
    time_limit: float | None = None  # seconds; stops early (demo)
    # with a time limit, the cosine also follows the clock: it reaches its floor at the
    # limit or at `steps`, whichever comes first (False: by steps alone, a step-exact schedule)
    lr_follows_time: bool = True
    objective: str = "auto"  # see OBJECTIVE_CHOICES, train()
    # the residual objective: the mean network (overrides of its preset: base_channels,
    # depth, convs), its loss, and the scale s of the residual r = (x0 - mean) / s
    mean_net: dict[str, Any] | None = None
    mean_loss: str = "mse"
    # weight of 1 - SSIM (as the benchmarks score it) added to the mean network's loss: more
    # local contrast for a little squared error (0: the posterior mean, squared error alone)
    mean_ssim: float = 0.0
    mean_init: str = "least-squares"  # see MEAN_INITS
    # the first mean_warmup x steps train the mean network alone (residual objective)
    mean_warmup: float = 0.0
    # samples of each batch (per process) the residual network trains on; None: all of them
    residual_batch: int | None = None
    residual_scale: float | None = None  # None: models.variants.DEFAULT_RESIDUAL_SCALE
    # calibration of the sample spread at the end of training (on the validation split)
    calibration_samples: int = 4  # N samples per patch (0: no calibration)
    calibration_patches: int = 32
    calibration_level: float = 0.9
    # the error head refitted to the final mean at the end of training
    # (training/error_refit.py): its steps (0: none; None: as many as the run's steps, at
    # most DEFAULT_REFIT_STEPS), and the share of a time limit given to it (the loop stops
    # that much earlier; the refit ends at the limit or after its steps)
    error_refit_steps: int | None = None
    error_refit_share: float = 0.05
    # the few-step schedule fitted at the end of training (residual kind, on validation
    # patches; enhance --spacing fitted): its number of steps (0: none; models/step_fit.py)
    fit_steps: int = DEFAULT_FIT_STEPS
    # input slices read beyond the bounding pair (isotropic recipes) or the slice to denoise
    # on each side (None: the run's own when resuming, the --init model's, else
    # models.z_context.DEFAULT_Z_CONTEXT for isotropic recipes and 0 for the others)
    z_context: int | None = None

    # ---- building --------------------------------------------------------------------
    @classmethod
    def build(
        cls, task: str, data: Sequence[str], overrides: Mapping[str, Any] | None = None
    ) -> TrainSettings:
        """The settings of a run on ``data`` (labels of the sources) with ``overrides``
        (field name -> value) over the defaults: unknown names raise ``TypeError`` (as an
        unknown keyword would), numbers are converted, then :meth:`validate` runs."""
        if task not in TASK_VARIANTS:
            raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASK_VARIANTS)}")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise TypeError(f"train() got unknown option(s) {', '.join(unknown)}")
        values = {name: _convert(name, value) for name, value in overrides.items()}
        settings = cls(task=task, data=list(data), **values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check the values; a regression run forces its prediction, loss and sampler steps."""
        for name in ("steps", "batch_size", "val_every", "ckpt_every", "val_steps", "val_batch",
                     "calibration_patches"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise InputError(f"lr must be positive, got {self.lr}")
        limit = self.time_limit
        if limit is not None and not (limit > 0 and math.isfinite(limit)):
            raise InputError(f"time_limit must be a positive number of seconds, got {limit}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(
                f"lr_schedule must be {' or '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.objective not in OBJECTIVE_CHOICES:
            raise InputError(
                f"objective must be {' or '.join(OBJECTIVE_CHOICES)}, got {self.objective!r}"
            )
        if self.axis not in AXES:
            raise InputError(f"axis must be 'y', 'x' or 'both', got {self.axis!r}")
        check_sampler(self.sampler)
        if self.precision not in TRAIN_PRECISIONS:
            raise InputError(
                f"precision must be {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}"
            )
        if self.mean_loss not in LOSS_NAMES:
            raise InputError(f"mean_loss must be {' or '.join(LOSS_NAMES)}, got {self.mean_loss!r}")
        if not (isinstance(self.mean_ssim, int | float) and 0 <= self.mean_ssim < math.inf):
            raise InputError(f"mean_ssim must be a weight >= 0, got {self.mean_ssim!r}")
        if self.mean_ssim and self.patch < _ssim_window():
            raise InputError(
                f"mean_ssim needs --patch {_ssim_window()} or more (the SSIM window), got "
                f"{self.patch}; use a larger patch or mean_ssim 0"
            )
        if self.mean_init not in MEAN_INITS:
            raise InputError(
                f"mean_init must be {' or '.join(MEAN_INITS)}, got {self.mean_init!r}"
            )
        for name in ("rotations", "lr_follows_time"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("intensity_jitter", "mean_warmup", "error_refit_share"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < 1):
                raise InputError(f"{name} must be a fraction in [0, 1), got {value!r}")
        if self.residual_batch is not None and not 1 <= self.residual_batch <= self.batch_size:
            raise InputError(
                f"residual_batch must be in 1..batch_size ({self.batch_size}), "
                f"got {self.residual_batch}"
            )
        if self.residual_scale is not None and not (
            math.isfinite(self.residual_scale) and self.residual_scale > 0
        ):
            raise InputError(f"residual_scale must be positive, got {self.residual_scale}")
        if self.error_refit_steps is not None and self.error_refit_steps < 0:
            raise InputError(
                f"error_refit_steps must be 0 (none) or positive, got {self.error_refit_steps}"
            )
        if not 0 <= self.fit_steps <= MAX_FIT_STEPS:
            raise InputError(
                f"fit_steps must be 0 (none) to {MAX_FIT_STEPS}, got {self.fit_steps}"
            )
        if self.calibration_samples != 0 and self.calibration_samples < 2:
            raise InputError(
                f"calibration_samples must be 0 (none) or at least 2, got {self.calibration_samples}"
            )
        if not 0 < self.calibration_level < 1:
            raise InputError(f"calibration_level must be in (0, 1), got {self.calibration_level}")
        if self.objective not in ("residual", "auto"):
            given = [n for n in RESIDUAL_FIELDS if getattr(self, n) not in (None, 0)]
            if given:
                raise InputError(
                    f"{', '.join(given)}: for objective 'residual' only (this run's is "
                    f"{self.objective!r}); leave out"
                )
        if self.z_context is not None:
            check_z_context(self.z_context, task=self.task, what=self.task)
        overrides = [n for n in ("unet", "mean_net") if getattr(self, n)]
        if self.init is not None and overrides:
            raise InputError(
                f"{', '.join(overrides)}: a fine-tuned model keeps the --init model's "
                "architecture; leave out"
            )
        if self.mean_net and self.task in TASK_VARIANTS:  # its fields, before any data is read
            from emdiffuse.models.presets import make_mean_net_config  # loads torch

            make_mean_net_config(TASK_VARIANTS[self.task], size=self.size, **self.mean_net)
        if self.unet is not None:
            fixed = sorted(set(self.unet) & set(_UNET_FIXED))
            if fixed:
                raise InputError(
                    f"unet: {', '.join(fixed)} follow(s) from the task and factor; leave out"
                )
        if self.objective == "regression":
            self.prediction, self.loss, self.val_steps = "x0", "l1", 1

    # ---- records ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def resume_mismatch(self, saved: Mapping[str, Any]) -> str | None:
        """The first of :data:`RESUME_FIELDS` that differs from a checkpoint's settings."""
        saved = {"objective": "diffusion", "z_context": 0, **saved}  # records from before the options
        for name in RESUME_FIELDS:  # compared as JSON: tuples and lists are one
            if saved.get(name) != json.loads(json.dumps(getattr(self, name))):
                return name
        return None


def field_names() -> list[str]:
    """The names :meth:`TrainSettings.build` accepts as overrides (every field but task, data)."""
    return [f.name for f in dataclasses.fields(TrainSettings) if f.name not in ("task", "data")]


def defaults() -> dict[str, Any]:
    """Every default, by field name (the command line's option defaults)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(TrainSettings)
        if f.default is not dataclasses.MISSING
    }


def refit_steps(s: TrainSettings) -> int:
    """The steps of the run's error-head refit (:mod:`emdiffuse.training.error_refit`)."""
    if s.error_refit_steps is None:
        return min(DEFAULT_REFIT_STEPS, s.steps)
    return s.error_refit_steps


def data_labels(sources: Sequence[Any]) -> list[str]:
    """How the settings record names the sources: paths as they are, arrays by type."""
    return [str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__ for x in sources]


_INTS = {"steps", "batch_size", "patch", "warmup", "val_steps", "val_every", "val_batch",
         "ckpt_every", "workers", "seed", "factor", "region", "calibration_samples",
         "calibration_patches", "residual_batch", "z_context", "error_refit_steps",
         "fit_steps"}  # fmt: skip
_FLOATS = {"lr", "min_lr_ratio", "weight_decay", "ema_decay", "grad_clip", "val_fraction",
           "time_limit", "residual_scale", "calibration_level", "intensity_jitter",
           "error_refit_share", "mean_ssim"}  # fmt: skip


def _ssim_window() -> int:
    """The side of SSIM's window in voxels (emdiffuse.metrics: loaded only where needed)."""
    from emdiffuse.metrics import GAUSSIAN_WINDOW  # noqa: PLC0415

    return GAUSSIAN_WINDOW


def _convert(name: str, value: Any) -> Any:
    """``value`` as the field's type (None stays None where the field allows it)."""
    if value is None:
        return None
    try:
        if name in _INTS:
            return int(value)
        if name in _FLOATS:
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if name in _INTS else "a number"
        raise InputError(f"{name} must be {kind}, got {value!r}") from None
    if name == "init":
        return str(value)
    if name in ("unet", "schedule", "mean_net"):
        return dict(value)
    if name == "voxel_size":
        return [float(v) for v in value]
    return value


# --------------------------------------------------------------------------------------
# the demo's settings
# --------------------------------------------------------------------------------------
# Settings that learn the synthetic denoising task on 2 CPU cores in about 5 minutes (the
# short-CPU recipe: the quality benchmark trains every model with them too): the tiny
# preset, the mean-plus-residual kind (its posterior mean and every sampler's output keep
# the clean intensities, where the SR3 kind's samples are 2-11 % too bright at this training
# length: benchmarks/results/intensity_bias.md), v-prediction (good at few sampler steps), a
# high learning rate with cosine decay, small 48² patches, and a fast EMA. Batches of 16 for
# the mean network, the residual network on 4 of them: a step costs 1.06-1.2x a batch of 8 on
# both, and the posterior mean scores higher at 10 of 11 synthetic and FlyEM levels for the
# same training time (benchmarks/quality/READING.md, twenty-second session).
DEMO_SETTINGS: dict[str, Any] = {
    "size": "tiny",
    "objective": "residual",
    "batch_size": 16,
    "residual_batch": 4,
    "patch": 48,
    "lr": 2e-3,
    "warmup": 50,
    "lr_schedule": "cosine",
    "min_lr_ratio": 0.05,
    "ema_decay": 0.995,
    "grad_clip": 1.0,
    "prediction": "v",
    "sampler": "ddim",
    "val_steps": 4,
    "val_every": 500,
    "val_batch": 4,
    "ckpt_every": 500,
    "region": 96,
    "val_fraction": 0.1,
}
# a kind with one network (the SR3 kind, the regression baseline; CAREamics' CARE in the
# benchmark) trains on batches of 8: CARE scores lower at 16 (READING.md, twelfth session)
SINGLE_NETWORK_BATCH = 8


def demo_recipe(objective: str = "residual", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEMO_SETTINGS` for a model of ``objective``, then ``overrides``: as they are for
    the residual kind; for a kind with one network, on batches of
    :data:`SINGLE_NETWORK_BATCH` and without the residual kind's own fields
    (:data:`RESIDUAL_FIELDS`, dropped from ``overrides`` too)."""
    recipe = {**DEMO_SETTINGS, "objective": objective}
    if objective not in ("residual", "auto"):
        recipe["batch_size"] = SINGLE_NETWORK_BATCH
    recipe.update(overrides or {})
    if objective not in ("residual", "auto"):
        recipe = {k: v for k, v in recipe.items() if k not in RESIDUAL_FIELDS}
    return recipe


DEMO_NOISE = {"dose": 2.0, "read_noise": 0.05}
DEMO_STEPS_PER_MINUTE = 300  # cosine horizon; training also stops at the time limit


__all__ = [
    "TrainSettings", "TASK_VARIANTS", "OBJECTIVES", "OBJECTIVE_CHOICES", "LOSS_NAMES", "MEAN_INITS", "LR_SCHEDULES", "AXES", "RESUME_FIELDS",
    "field_names", "defaults", "data_labels", "DEMO_SETTINGS", "DEMO_NOISE", "RESIDUAL_FIELDS",
    "SINGLE_NETWORK_BATCH", "demo_recipe", "DEFAULT_REFIT_STEPS", "refit_steps",
    "DEMO_STEPS_PER_MINUTE",
]  # fmt: skip
