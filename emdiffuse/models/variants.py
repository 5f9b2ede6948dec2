"""The four EMDiffuse variants: what goes in, what comes out (named size presets:
:mod:`emdiffuse.models.presets`).

A :class:`ModelConfig` is everything needed to rebuild a network and use it: the variant and
its task, the scale factor, the UNet architecture, the noise schedule, the prediction target
and loss, the intensity normalisation of the training data and its voxel size. It is stored as
JSON inside every checkpoint (``emdiffuse.models.checkpoints``).

Contracts (per network input tile; ``k`` is ``scale_factor``):

============  =============  =========  ==========  ========  =======
variant       task           in_slices  out_slices  xy_scale  z_scale
============  =============  =========  ==========  ========  =======
emdiffuse-n   denoise        1 + 2c     1           1         1
emdiffuse-r   super-resolve  1          1           k         1
vemdiffuse-i  isotropic      2 + 2c     k - 1       1         k
vemdiffuse-a  isotropic      2 + 2c     k - 1       1         k
============  =============  =========  ==========  ========  =======

``c`` is :attr:`ModelConfig.z_context`: input slices beyond the bounding pair (isotropic) or
the slice to denoise (emdiffuse-n) on each side (0, the reference's layout; isotropic 1: four
slices, as cubic interpolation reads; denoise 1: the noisy slice and its two neighbours;
:mod:`emdiffuse.models.z_context`).

Isotropic variants come in two network layouts:

* **output channels** (default, ``use_index_embedding=False``): one pass of the network
  produces all ``k - 1`` in-between slices as output channels. The UNet sees
  ``in_channels = 2 + (k - 1)`` (the two bounding slices, then the ``k - 1`` noisy targets) and
  returns ``out_channels = k - 1``. One pass instead of ``k - 1``: much faster.
* **index embedding** (``use_index_embedding=True``), the reference vEMDiffuse layout: the
  network produces one slice per pass (``in_channels = 3``, ``out_channels = 1``) and an
  embedded index in ``[0, k - 2]`` says which one. Kept for weights imported from the
  reference; :class:`~emdiffuse.models.enhancer.Enhancer` loops over the indices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emdiffuse import __version__
from emdiffuse.errors import InputError
from emdiffuse.models.conditioning import UPSAMPLE_MODES
from emdiffuse.models.config_fields import (
    check_calibration,
    check_normalization,
    check_schedule,
    check_step_schedules,
    describe_schedule,
    index_classes,
    jsonable,
    unet_from_dict,
)
from emdiffuse.models.mean_net import MeanNetConfig
from emdiffuse.models.unet import UNetConfig
from emdiffuse.models.z_context import check_z_context, condition_slices

VARIANTS: dict[str, str] = {
    "emdiffuse-n": "denoise",
    "emdiffuse-r": "super-resolve",
    "vemdiffuse-i": "isotropic",
    "vemdiffuse-a": "isotropic",
}
TASKS = ("denoise", "super-resolve", "isotropic")
PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("mse", "l1")
SIZES = ("tiny", "small", "reference")
# "sr3": one diffusion UNet samples the target conditioned on the input (the reference's
# design; reference weights are of this kind). "residual": mean plus residual — a regression
# network predicts the posterior mean in one evaluation and a diffusion UNet samples only the
# residual (target - mean) / residual_scale, conditioned on the input and the mean.
KINDS = ("sr3", "residual")
# The residual kind's default scale s (model space): r = (x0 - mean) / s should have a
# standard deviation near that of the data the schedule was made for (order 0.5-1). The mean
# network's error on EM data at moderate training is 0.1-0.3 in model space (a 17-22 dB
# regression), so s = 0.2 puts the residual at unit scale (measured: benchmarks/results/mean_residual.md).
DEFAULT_RESIDUAL_SCALE = 0.2

# The reference's training schedule (EMDiffuse configs, "beta_schedule.train"): linear betas
# over 2000 steps from 1e-6 to 1e-2. The network is trained on a continuous noise level, so
# any inference schedule is valid at run time.
REFERENCE_SCHEDULE: dict[str, Any] = {
    "kind": "linear",
    "steps": 2000,
    "beta_start": 1e-6,
    "beta_end": 1e-2,
}
# The reference's inference schedule ("beta_schedule.test" of its published configs): its
# ancestral sampler walks these 1000 alpha-bars, from 6.6e-21 (far noisier than any training
# level) to 0.9999. Imported reference weights store it as ``inference_schedule``.
REFERENCE_TEST_SCHEDULE: dict[str, Any] = {
    "kind": "linear",
    "steps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.09,
}

def _version() -> str:
    return __version__


@dataclass
class ModelConfig:
    """Variant, architecture, schedule and data statistics of one model (JSON round trip).

    ``normalization`` holds the raw-intensity percentiles ``{"low", "high"}`` (0.5 % and
    99.5 %) of the training TARGET (what outputs are denormalised with);
    ``condition_normalization`` those of the condition (the model's input), None meaning
    "the same as ``normalization``" (checkpoints from before the split, reference imports);
    see :mod:`emdiffuse.models.normalization`. ``voxel_size_nm`` is the training data's
    voxel size (zyx, nm) or None.

    ``kind`` (:data:`KINDS`): ``"sr3"`` (one diffusion UNet, ``unet``) or ``"residual"``
    (mean plus residual: the regression network ``mean_net`` predicts the posterior mean,
    the diffusion UNet ``unet`` samples ``(x0 - mean) / residual_scale`` conditioned on
    ``[condition, mean]``; not for index-embedding layouts). ``calibration`` is the
    conformal scale of the sample spread fitted at the end of training
    (:mod:`emdiffuse.models.calibration`), or None.
    ``inference_schedule`` is the noise schedule sampling walks (same form as ``schedule``;
    for imported reference weights its ``beta_schedule.test``), or None: sample on the
    training ``schedule`` (checkpoints from before the field). See :attr:`sampling_schedule`.
    ``cond_upsample`` is how super-resolution puts its input on the output grid
    (:mod:`emdiffuse.models.conditioning`): ``"bicubic"``, or ``"bilinear"`` for reference
    weights. ``z_context`` (isotropic and denoise) is the number of input slices the network
    reads beyond the two bounding slices (the slice to denoise) on each side (see the module
    docstring; 0 for checkpoints from before the field and for reference weights).
    ``step_schedules`` (residual kind) holds the few-step schedules fitted to the model at the
    end of training (:mod:`emdiffuse.models.step_fit`; a run walks one with spacing
    ``fitted``), or None.
    """

    variant: str
    task: str
    scale_factor: int
    unet: UNetConfig
    schedule: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE_SCHEDULE))
    prediction: str = "eps"
    loss: str = "mse"
    normalization: dict[str, float] = field(default_factory=lambda: {"low": 0.0, "high": 1.0})
    voxel_size_nm: tuple[float, ...] | None = None
    training_data: str = ""
    use_index_embedding: bool = False
    cond_upsample: str = "bicubic"
    condition_normalization: dict[str, float] | None = None
    kind: str = "sr3"
    mean_net: MeanNetConfig | None = None
    residual_scale: float | None = None
    calibration: dict[str, Any] | None = None
    inference_schedule: dict[str, Any] | None = None
    z_context: int = 0
    step_schedules: dict[str, Any] | None = None
    emdiffuse_version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        if self.voxel_size_nm is not None:
            self.voxel_size_nm = tuple(float(v) for v in self.voxel_size_nm)
        if self.mean_net is not None:
            self.mean_net = MeanNetConfig.from_dict(self.mean_net)
        self.validate()

    # ---- contracts -------------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.scale_factor)

    @property
    def isotropic(self) -> bool:
        return self.task == "isotropic"

    @property
    def in_slices(self) -> int:
        """Input z-slices per tile (channels of the conditioning): the bounding pair
        (isotropic) or the slice itself, and ``z_context`` more on each side."""
        return condition_slices(self.z_context, isotropic=self.isotropic)

    @property
    def out_slices(self) -> int:
        """Output z-slices per tile (for isotropic: the k - 1 slices between the two inputs)."""
        return self.k - 1 if self.isotropic else 1

    @property
    def xy_scale(self) -> int:
        return self.k if self.task == "super-resolve" else 1

    @property
    def z_scale(self) -> int:
        return self.k if self.isotropic else 1

    @property
    def dims(self) -> int:
        """Spatial dimensions of the network (2 or 3)."""
        return int(self.unet.dims)

    @property
    def net_out_channels(self) -> int:
        """Channels one network pass produces (1 in index-embedding mode)."""
        return 1 if self.use_index_embedding else self.out_slices

    @property
    def sampling_schedule(self) -> dict[str, Any]:
        """The schedule samplers walk: ``inference_schedule``, else the training ``schedule``."""
        return dict(self.schedule if self.inference_schedule is None else self.inference_schedule)

    def describe_sampling(self) -> str:
        """Which schedule sampling walks, in words (for run reports and the import)."""
        role = "training" if self.inference_schedule is None else "inference"
        return f"{describe_schedule(self.sampling_schedule)} (the model's {role} schedule)"

    @property
    def residual(self) -> bool:
        """A mean-plus-residual model (``kind == "residual"``)."""
        return self.kind == "residual"

    @property
    def multiple(self) -> int:
        """Every network's total downsampling (the residual kind's mean network's too):
        tile and patch sides on the output grid must be multiples of it."""
        mean = self.mean_net.multiple if self.mean_net is not None else 1
        return math.lcm(self.unet.multiple, mean)

    @property
    def net_cond_channels(self) -> int:
        """Conditioning channels of the diffusion UNet: the input slices, and for the
        residual kind the mean after them."""
        return self.in_slices + (self.out_slices if self.residual else 0)

    @property
    def net_in_channels(self) -> int:
        """Channels one network pass takes: conditioning, then the noisy target(s)."""
        return self.net_cond_channels + self.net_out_channels

    @property
    def passes(self) -> int:
        """Network passes per sampler step to produce all ``out_slices``."""
        return self.out_slices if self.use_index_embedding else 1

    # ---- validation ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`InputError` naming the first inconsistent field."""
        if self.variant not in VARIANTS:
            raise InputError(
                f"model config: unknown variant {self.variant!r}; "
                f"choose one of {', '.join(VARIANTS)}"
            )
        if self.task not in TASKS:
            raise InputError(
                f"model config: unknown task {self.task!r}; choose one of {', '.join(TASKS)}"
            )
        if VARIANTS[self.variant] != self.task:
            raise InputError(
                f"model config: variant {self.variant} does task {VARIANTS[self.variant]!r}, "
                f"but task is {self.task!r}; fix the 'task' field"
            )
        if isinstance(self.scale_factor, bool) or not isinstance(self.scale_factor, int):
            raise InputError(
                f"model config: scale_factor must be an integer, got {self.scale_factor!r}"
            )
        if self.task == "denoise" and self.scale_factor != 1:
            raise InputError(
                f"model config: scale_factor is {self.scale_factor} but a denoiser "
                "(emdiffuse-n) keeps the grid; set scale_factor to 1"
            )
        if self.task == "super-resolve" and self.scale_factor < 2:
            raise InputError(
                f"model config: scale_factor is {self.scale_factor}; super-resolution "
                "(emdiffuse-r) needs an xy factor of 2 or more"
            )
        if self.isotropic and self.scale_factor < 2:
            raise InputError(
                f"model config: scale_factor is {self.scale_factor}; isotropic reconstruction "
                f"({self.variant}) needs a z factor of 2 or more"
            )
        if self.use_index_embedding and not self.isotropic:
            raise InputError(
                f"model config: use_index_embedding is only for isotropic variants, "
                f"not {self.variant}"
            )
        self._validate_z_context()
        if self.prediction not in PREDICTIONS:
            raise InputError(
                f"model config: unknown prediction {self.prediction!r}; "
                f"choose one of {', '.join(PREDICTIONS)}"
            )
        if self.loss not in LOSSES:
            raise InputError(
                f"model config: unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}"
            )
        check_schedule(self.schedule)
        if self.inference_schedule is not None:
            check_schedule(self.inference_schedule, "inference_schedule")
        check_normalization(self.normalization)
        if self.condition_normalization is not None:
            check_normalization(self.condition_normalization, "condition_normalization")
        if self.calibration is not None:
            check_calibration(self.calibration)
        if self.step_schedules is not None:
            check_step_schedules(self.step_schedules)
        self._validate_kind()
        if self.cond_upsample not in UPSAMPLE_MODES:
            raise InputError(
                f"model config: unknown cond_upsample {self.cond_upsample!r}; "
                f"choose one of {', '.join(UPSAMPLE_MODES)}"
            )
        if self.voxel_size_nm is not None and (
            len(self.voxel_size_nm) not in (2, 3)
            or not all(math.isfinite(v) and v > 0 for v in self.voxel_size_nm)
        ):
            raise InputError(
                f"model config: voxel_size_nm {self.voxel_size_nm} must be 2 or 3 positive "
                "sizes in nm (zyx) or null"
            )
        self._validate_unet()

    def _validate_z_context(self) -> None:
        check_z_context(self.z_context, task=self.task, what=self.variant,
                        prefix="model config: ")  # fmt: skip
        if self.z_context and self.unet.dims == 3:
            raise InputError(
                "model config: a 3D network sees its neighbouring slices already; "
                "set z_context to 0"
            )
        if self.z_context and self.use_index_embedding:
            raise InputError(
                "model config: the index-embedding layout (the reference's) reads the two "
                "bounding slices only; set z_context to 0"
            )

    def _validate_kind(self) -> None:
        if self.kind not in KINDS:
            raise InputError(
                f"model config: unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}"
            )
        if not self.residual:
            if self.mean_net is not None or self.residual_scale is not None:
                raise InputError(
                    "model config: mean_net and residual_scale belong to kind 'residual'; "
                    "remove them or set kind to 'residual'"
                )
            if self.step_schedules is not None:
                raise InputError("model config: step_schedules belong to kind 'residual'")
            return
        if self.use_index_embedding:
            raise InputError(
                "model config: the residual kind needs output channels for the in-between "
                "slices, not an index embedding; set use_index_embedding to false"
            )
        scale = self.residual_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0
        ):
            raise InputError(
                f"model config: residual_scale must be a positive number, got {scale!r}"
            )
        m = self.mean_net
        if m is None:
            raise InputError("model config: kind 'residual' needs a 'mean_net'")
        if m.dims != self.unet.dims:
            raise InputError(
                f"model config: mean_net.dims is {m.dims} but unet.dims is {self.unet.dims}"
            )
        if m.in_channels != self.in_slices or m.out_channels != self.out_slices:
            raise InputError(
                f"model config: mean_net maps {m.in_channels} -> {m.out_channels} channels but "
                f"{self.variant} (scale_factor {self.k}) needs {self.in_slices} -> "
                f"{self.out_slices}"
            )

    def _validate_unet(self) -> None:
        u = self.unet
        if u.dims not in (2, 3):
            raise InputError(f"model config: unet.dims is {u.dims}; must be 2 or 3")
        if u.dims == 3 and self.isotropic:
            raise InputError(
                f"model config: unet.dims is 3 but {self.variant} uses a 2D network over "
                "slices; set unet.dims to 2"
            )
        if u.in_channels != self.net_in_channels:
            raise InputError(
                f"model config: unet.in_channels is {u.in_channels} but {self.variant} "
                f"(scale_factor {self.k}{', index embedding' if self.use_index_embedding else ''})"
                f" needs {self.net_in_channels} ({self.net_cond_channels} conditioning + "
                f"{self.net_out_channels} noisy)"
            )
        if u.out_channels != self.net_out_channels:
            raise InputError(
                f"model config: unet.out_channels is {u.out_channels} but {self.variant} "
                f"(scale_factor {self.k}) needs {self.net_out_channels}"
            )
        n_index = index_classes(u)
        if self.use_index_embedding and n_index < self.out_slices:
            raise InputError(
                f"model config: unet has {n_index} index embeddings but {self.variant} "
                f"with z factor {self.k} needs {self.out_slices} (indices 0..{self.k - 2})"
            )
        if not self.use_index_embedding and n_index:
            raise InputError(
                f"model config: unet has an index embedding ({n_index}) but "
                "use_index_embedding is false; set one or the other"
            )

    def describe(self) -> str:
        """Short human description, e.g. ``vemdiffuse-i (isotropic, z×4)``."""
        if self.task == "denoise":
            what = "denoise"
        elif self.task == "super-resolve":
            what = f"super-resolve, xy×{self.k}"
        else:
            what = f"isotropic, z×{self.k}"
        if self.z_context:
            what += f", {self.in_slices} input slices"
        return f"{self.variant} ({what})"

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["unet"] = jsonable(dataclasses.asdict(self.unet))
        out["voxel_size_nm"] = None if self.voxel_size_nm is None else list(self.voxel_size_nm)
        out["schedule"] = jsonable(dict(self.schedule))
        if self.inference_schedule is not None:
            out["inference_schedule"] = jsonable(dict(self.inference_schedule))
        out["normalization"] = {k: float(v) for k, v in self.normalization.items()}
        if self.condition_normalization is not None:
            out["condition_normalization"] = {
                k: float(v) for k, v in self.condition_normalization.items()
            }
        out["mean_net"] = None if self.mean_net is None else self.mean_net.to_dict()
        out["calibration"] = None if self.calibration is None else jsonable(dict(self.calibration))
        if self.step_schedules is not None:
            out["step_schedules"] = jsonable(dict(self.step_schedules))
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        if not isinstance(data, Mapping):
            raise InputError("model config: expected a JSON object")
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"model config: unknown field(s) {', '.join(unknown)}")
        for required in ("variant", "task", "scale_factor", "unet"):
            if required not in data:
                raise InputError(f"model config: missing field {required!r}")
        data["unet"] = unet_from_dict(data["unet"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelConfig:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"model config: not valid JSON ({error})") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
