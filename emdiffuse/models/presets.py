"""Named model presets: network sizes (``tiny``, ``small``, ``reference``) and the
:class:`~emdiffuse.models.variants.ModelConfig` of a variant at a size (:func:`make_config`).

The UNet's channels follow the variant's contract (:mod:`emdiffuse.models.variants`); the
residual kind adds its mean network (:class:`~emdiffuse.models.mean_net.MeanNetConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from emdiffuse.errors import InputError
from emdiffuse.models.config_fields import index_field
from emdiffuse.models.mean_net import MeanNetConfig
from emdiffuse.models.unet import UNetConfig
from emdiffuse.models.variants import (
    DEFAULT_RESIDUAL_SCALE,
    KINDS,
    REFERENCE_SCHEDULE,
    SIZES,
    VARIANTS,
    ModelConfig,
)
from emdiffuse.models.z_context import condition_slices

# Network sizes. "reference" is the published EMDiffuse UNet (32 base channels, multipliers
# 1-2-4-8, 2 residual blocks per level, self-attention at 16x16, 32 channels per head,
# dropout 0.2, trained on 256x256 patches). "tiny" runs a 64x64 tile in milliseconds on a CPU.
_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "base_channels": 16,
        "channel_mults": (1, 2, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (),
        "num_head_channels": 16,
        "dropout": 0.0,
        "image_size": 64,
    },
    "small": {
        "base_channels": 32,
        "channel_mults": (1, 2, 2, 4),
        "num_res_blocks": 1,
        "attention_resolutions": (16,),
        "num_head_channels": 32,
        "dropout": 0.1,
        "image_size": 128,
    },
    "reference": {
        "base_channels": 32,
        "channel_mults": (1, 2, 4, 8),
        "num_res_blocks": 2,
        "attention_resolutions": (16,),
        "num_head_channels": 32,
        "dropout": 0.2,
        "image_size": 256,
    },
}


# The linear skip of a new 2D isotropic mean network: 7×7, started at the least-squares
# (Wiener) filter of the training data and kept there (training.build.skip_is_fixed). On FlyEM
# after 2.5 min it beat the 1×1 skip by 0.17 and 0.36 dB (two seeds) for isotropic ×4; denoising gained nothing
# clear (+0.04 at 8 e⁻/px, 0.00 at 2 e⁻/px) and super-resolution ×4 lost 1.0 dB, so the other
# tasks and 3D mean networks keep 1×1 (benchmarks/quality/READING.md, fourteenth session).
DEFAULT_MEAN_SKIP = 7

# Mean networks of the residual kind (a CARE-sized regression UNet: 32 base channels, two
# downsamplings, two 3x3 convolutions per level, no attention, a norm after each
# convolution). The norm is batch norm (twenty-fourth session: with its output offset
# re-fitted at the end of training, FlyEM denoising at 2 e⁻/px scored 23.95 / 0.550 and
# 23.98 / 0.553 for two seeds against the channel norm's 23.76 / 0.542 and 23.75 / 0.543,
# bias within ±0.05 %; benchmarks/quality/READING.md). Without any norm the reference
# size's body died in training (seventeenth session); checkpoints made before a norm load
# without one, the seventeenth to twenty-third sessions' with the per-voxel channel norm.
_MEAN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"base_channels": 32, "depth": 2, "convs": 2, "batch_norm": True},
    "small": {"base_channels": 32, "depth": 3, "convs": 2, "batch_norm": True},
    "reference": {"base_channels": 32, "depth": 3, "convs": 2, "batch_norm": True},
}
# the mean network's norms: an override naming one of them replaces the preset's choice
_MEAN_NORMS = ("channel_norm", "batch_norm")

# Width of the mean network's error head (``mean_net.error_channels``,
# :class:`~emdiffuse.models.mean_net.ErrorNet`): the posterior mean's per-voxel error σ, so
# that ``enhance --samples 0`` writes calibrated intervals too (nineteenth session,
# benchmarks/quality/READING.md); 0 turns it off.
DEFAULT_ERROR_CHANNELS = 16


def make_unet_config(
    variant: str,
    *,
    size: str = "tiny",
    scale_factor: int | None = None,
    use_index_embedding: bool = False,
    dims: int = 2,
    kind: str = "sr3",
    z_context: int = 0,
) -> UNetConfig:
    """The (diffusion) UNet architecture of a preset (channels follow the variant's contract,
    ``z_context`` included; the residual kind's UNet also takes the mean as conditioning)."""
    if size not in _SIZES:
        raise InputError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    task = VARIANTS[variant]
    k = _default_scale(task) if scale_factor is None else int(scale_factor)
    isotropic = task == "isotropic"
    out = (1 if use_index_embedding else k - 1) if isotropic else 1
    cond = condition_slices(z_context, isotropic=isotropic)
    if kind == "residual":
        cond += out
    preset = dict(_SIZES[size])
    kwargs: dict[str, Any] = {
        "dims": dims,
        "in_channels": cond + out,
        "out_channels": out,
        **preset,
    }
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    kwargs = {key: value for key, value in kwargs.items() if key in names}
    if use_index_embedding and task == "isotropic":
        kwargs[index_field()] = max(k - 1, 1)
    return UNetConfig(**kwargs)


def make_mean_net_config(
    variant: str, *, size: str = "tiny", scale_factor: int | None = None, dims: int = 2,
    z_context: int = 0, **overrides: Any,
) -> MeanNetConfig:
    """The mean network of a preset (the residual kind), with ``overrides`` of its fields
    (``base_channels``, ``depth``, ``convs``, ``skip_size``: :data:`DEFAULT_MEAN_SKIP` for
    2D isotropic models, else 1; ``batch_norm`` on, or the norm an override names;
    ``error_channels``: :data:`DEFAULT_ERROR_CHANNELS`)."""
    if size not in _MEAN_SIZES:
        raise InputError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    task = VARIANTS[variant]
    k = _default_scale(task) if scale_factor is None else int(scale_factor)
    cond = condition_slices(z_context, isotropic=task == "isotropic")
    out = k - 1 if task == "isotropic" else 1
    fixed = sorted(set(overrides) & {"dims", "in_channels", "out_channels"})
    if fixed:
        raise InputError(f"mean_net: {', '.join(fixed)} follow(s) from the task; leave out")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MeanNetConfig)})
    if unknown:
        raise InputError(f"mean_net: unknown field(s) {', '.join(unknown)}")
    skip = DEFAULT_MEAN_SKIP if dims == 2 and task == "isotropic" else 1
    preset = dict(_MEAN_SIZES[size])
    if any(name in overrides for name in _MEAN_NORMS):  # the caller chose the norm
        preset = {k: v for k, v in preset.items() if k not in _MEAN_NORMS}
    fields = {"skip_size": skip, "error_channels": DEFAULT_ERROR_CHANNELS, **preset,
              **overrides}  # fmt: skip
    return MeanNetConfig(dims=dims, in_channels=cond, out_channels=out, **fields)


def _default_scale(task: str) -> int:
    return {"denoise": 1, "super-resolve": 2, "isotropic": 4}[task]


def make_config(
    variant: str,
    size: str = "tiny",
    *,
    scale_factor: int | None = None,
    prediction: str = "eps",
    loss: str = "mse",
    schedule: Mapping[str, Any] | None = None,
    use_index_embedding: bool = False,
    dims: int = 2,
    normalization: Mapping[str, float] | None = None,
    voxel_size_nm: tuple[float, ...] | None = None,
    training_data: str = "",
    condition_normalization: Mapping[str, float] | None = None,
    kind: str = "sr3",
    mean_net: Mapping[str, Any] | None = None,
    residual_scale: float | None = None,
    z_context: int = 0,
) -> ModelConfig:
    """A named preset: ``variant`` in ``VARIANTS``, ``size`` in ``tiny|small|reference``.

    ``scale_factor`` is the xy factor for emdiffuse-r (default 2), the z factor for
    vemdiffuse-i/-a (default 4) and 1 for emdiffuse-n. ``dims=3`` gives a 3D UNet (denoise and
    super-resolve only). Defaults follow the reference: linear schedule over 2000 steps,
    epsilon prediction, MSE. ``kind="residual"`` adds the preset's mean network (fields
    overridden by ``mean_net``) and ``residual_scale`` (default
    :data:`DEFAULT_RESIDUAL_SCALE`). ``z_context`` (isotropic, denoise): input slices read beyond
    the bounding pair (the slice to denoise) on each side (:class:`ModelConfig`).
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    task = VARIANTS[variant]
    k = _default_scale(task) if scale_factor is None else scale_factor
    if kind not in KINDS:
        raise InputError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "residual" and use_index_embedding:
        raise InputError(
            "the residual kind predicts all in-between slices as output channels; it has no "
            "index embedding layout"
        )
    unet = make_unet_config(
        variant, size=size, scale_factor=k, use_index_embedding=use_index_embedding, dims=dims,
        kind=kind, z_context=z_context,
    )
    residual: dict[str, Any] = {}
    if kind == "residual":
        residual = {
            "kind": kind,
            "mean_net": make_mean_net_config(
                variant, size=size, scale_factor=k, dims=dims, z_context=z_context,
                **dict(mean_net or {}),
            ),
            "residual_scale": float(
                DEFAULT_RESIDUAL_SCALE if residual_scale is None else residual_scale
            ),
        }
    return ModelConfig(
        variant=variant,
        task=task,
        scale_factor=k,
        unet=unet,
        schedule=dict(REFERENCE_SCHEDULE if schedule is None else schedule),
        prediction=prediction,
        loss=loss,
        normalization=dict(normalization or {"low": 0.0, "high": 1.0}),
        voxel_size_nm=voxel_size_nm,
        training_data=training_data,
        use_index_embedding=use_index_embedding,
        condition_normalization=(
            None if condition_normalization is None else dict(condition_normalization)
        ),
        z_context=z_context,
        **residual,
    )


__all__ = [
    "make_config", "make_unet_config", "make_mean_net_config", "DEFAULT_MEAN_SKIP",
    "DEFAULT_ERROR_CHANNELS",
]  # fmt: skip
