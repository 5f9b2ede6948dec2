"""What a training run is made of, built from its settings: the patch dataset, the model
config (a preset, or the ``--init`` model's, plus the data's statistics) and the network."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.checkpoints import config_from_file, load_checkpoint
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.mean_net import least_squares_skip
from emdiffuse.models.networks import build_network
from emdiffuse.models.presets import make_config
from emdiffuse.models.unet import UNetConfig
from emdiffuse.models.variants import ModelConfig
from emdiffuse.models.z_context import DEFAULT_Z_CONTEXT
from emdiffuse.training.augment import training_augment
from emdiffuse.training.loader import PatchDataset
from emdiffuse.training.settings import TASK_VARIANTS, TrainSettings
from emdiffuse.training.state import latest_checkpoint, load_state


def split_data(data) -> list[Any]:
    """The sources of ``data``: a comma-separated string of paths, or a sequence."""
    if isinstance(data, (str, os.PathLike)):
        return [p for p in str(data).split(",") if p]
    return list(data)


def build_dataset(s: TrainSettings, sources: Sequence[Any], **kw) -> PatchDataset:
    """The training patches of ``s`` (``kw``: further :class:`PatchDataset` options)."""
    return PatchDataset(
        s.task,
        sources,
        s.patch,
        factor=s.factor,
        val_fraction=s.val_fraction,
        region=s.region,
        seed=s.seed,
        batch_size=s.batch_size,
        axis=s.axis,
        voxel_size=s.voxel_size,
        augment=training_augment(s.task, s.intensity_jitter, s.rotations),
        z_context=s.z_context or 0,
        **kw,
    )


def resolve_objective(s: TrainSettings, out: str | os.PathLike, resume: bool) -> str:
    """The objective ``"auto"`` stands for, set in ``s`` (and ``s`` checked again): the run's
    own when resuming (its ``settings.json``, else its latest checkpoint's), the ``--init``
    model's kind when fine-tuning (``sr3`` -> diffusion, ``residual`` -> residual), and
    ``residual`` for a new model (it beats the SR3 kind in every row of the quality
    benchmark). Any other objective is kept."""
    if s.objective == "auto":
        s.objective = _auto_objective(s, Path(out), resume)
        s.validate()
    return s.objective


def _auto_objective(s: TrainSettings, out: Path, resume: bool) -> str:
    saved = _saved_settings(out) if resume else None
    if saved is not None:  # records from before the option are the SR3 kind
        return str(saved.get("objective", "diffusion"))
    if s.init is not None:
        config, _ = load_checkpoint(s.init)
        return "residual" if config.residual else "diffusion"
    return "residual"


def _saved_settings(out: Path) -> dict[str, Any] | None:
    """The settings record of the run in ``out`` (its ``settings.json``, else its latest
    checkpoint's), or None."""
    saved = None
    if (out / "settings.json").is_file():
        try:
            saved = json.loads((out / "settings.json").read_text())
        except (OSError, ValueError):
            saved = None
    if not isinstance(saved, dict):
        ckpt = latest_checkpoint(out)
        saved = json.loads(load_state(ckpt)["settings"]) if ckpt is not None else None
    return saved if isinstance(saved, dict) else None


def resolve_z_context(s: TrainSettings, out: str | os.PathLike, resume: bool) -> int:
    """The z context (input slices beyond the bounding pair of isotropic recipes, or beyond
    the slice to denoise) ``None`` stands for, set in ``s``: the run's own when resuming (0
    for runs from before the option), the ``--init`` model's when fine-tuning,
    :data:`DEFAULT_Z_CONTEXT` for a new isotropic model and 0 for the other tasks. A given
    value is kept; one that differs from the ``--init`` model's is refused (the network's
    input channels follow from it)."""
    isotropic = s.task in ("isotropic", "anisotropic")
    init_context = None
    if s.init is not None and not resume:
        init_context = config_from_file(s.init).z_context
    if s.z_context is None:
        saved = _saved_settings(Path(out)) if resume else None
        if saved is not None:
            s.z_context = int(saved.get("z_context") or 0)
        elif init_context is not None:
            s.z_context = init_context
        else:
            s.z_context = DEFAULT_Z_CONTEXT if isotropic else 0
    elif init_context is not None and s.z_context != init_context:
        raise InputError(
            f"--z-context {s.z_context} but the --init model reads {init_context} slice(s) "
            f"on each side; leave --z-context out to fine-tune it as it is"
        )
    s.validate()
    return s.z_context


def load_init(s: TrainSettings) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ``--init`` model to fine-tune (config, weights)."""
    config, state = load_checkpoint(s.init)
    if s.objective == "regression" and config.prediction != "x0":
        raise InputError(
            f"--init model predicts {config.prediction!r}; a regression run "
            "fine-tunes only a regression (x0) model"
        )
    wanted = "residual" if s.objective == "residual" else "sr3"
    if config.kind != wanted:
        raise InputError(
            f"--init model is of kind {config.kind!r} but objective {s.objective!r} trains "
            f"kind {wanted!r}; fine-tune with the objective the model was trained with"
        )
    return config, state


def build_config(s: TrainSettings, dataset, init_config: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a run: a preset (or the --init model's) plus the data's statistics
    (the target's and the condition's intensity ranges, voxel size, data labels)."""
    variant = TASK_VARIANTS[s.task]
    data = {
        "normalization": dict(dataset.normalization),
        "condition_normalization": dict(dataset.condition_normalization),
        "voxel_size_nm": dataset.voxel_size,
        "training_data": ",".join(str(d) for d in s.data),
    }
    if init_config is not None:
        _check_init(init_config, variant, s.task, dataset.k)
        # what was fitted to the init model's weights at the end of its training does not
        # hold for the new ones: this run fits its own, or leaves none
        return init_config.replace(variant=variant, calibration=None, step_schedules=None, **data)
    kwargs: dict[str, Any] = {}
    if s.schedule is not None:
        kwargs["schedule"] = s.schedule
    if s.objective == "residual":
        kwargs.update(kind="residual", mean_net=s.mean_net, residual_scale=s.residual_scale)
    if dataset.z_context:
        kwargs["z_context"] = dataset.z_context
    config = make_config(
        variant, s.size, scale_factor=dataset.k, prediction=s.prediction, loss=s.loss,
        **data, **kwargs,
    )  # fmt: skip
    if s.unet:
        config = config.replace(unet=_override_unet(config.unet, s.unet))
    return config


def _check_init(init_config: ModelConfig, variant: str, task: str, k: int) -> None:
    if init_config.variant != variant and not (
        init_config.task == "isotropic" and task in ("isotropic", "anisotropic")
    ):
        raise InputError(
            f"--init model is {init_config.describe()} but this run trains {task}; "
            "fine-tune from a model of the same task"
        )
    if init_config.scale_factor != k:
        raise InputError(
            f"--init model has scale factor {init_config.scale_factor} but --factor is "
            f"{k}; use the same factor"
        )


def _override_unet(unet: UNetConfig, overrides: Mapping[str, Any]) -> UNetConfig:
    """The preset's architecture with some fields replaced (``TrainSettings.unet``)."""
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InputError(f"unet: unknown field(s) {', '.join(unknown)}; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        return dataclasses.replace(unet, **values)
    except TypeError as error:
        raise InputError(f"unet: {error}") from None


def build_net(config: ModelConfig, seed: int) -> torch.nn.Module:
    """The network of ``config`` (a UNet, or mean + residual networks in one module),
    initialised from ``seed`` (torch's global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(config)


# training patches the mean network's starting skip is fitted on (fit_mean_skip)
SKIP_FIT_PATCHES = 64


def fit_mean_skip(
    net: torch.nn.Module, config: ModelConfig, dataset: PatchDataset
) -> tuple[list[list[float]], list[float]]:
    """Set a new residual-kind network's mean skip to the least-squares linear map from
    condition to target (per voxel, or the Wiener filter of the skip's width) on the first
    :data:`SKIP_FIT_PATCHES` training patches (a pure function of the data and seed).
    Returns ``(weights, bias)``.

    At a low dose the best such map shrinks the noisy input strongly towards the mean (on
    FlyEM at 2 e⁻/px it keeps 8 % of the input in raw units): started at the input itself,
    the skip still passed 99 % of it after 500 steps and the model ended 0.45 dB lower
    (benchmarks/results/mean_init.md). The patches are fitted as read, not augmented: flips
    and rotations would make the filter symmetric, and EM's x and y often differ (on FlyEM
    isotropic ×4 the augmented fit of a 7×7 skip scored 0.4 dB lower).
    """
    batch = dataset.batch(range(SKIP_FIT_PATCHES), split="train", augment=False)
    cond = upsample_xy(batch["cond"].float(), config.xy_scale, config.cond_upsample)
    weights, bias = least_squares_skip(cond, batch["target"].float(), config.mean_net.skip_size)
    net.mean.init_skip(weights, bias)
    return weights, bias


def skip_is_fixed(s: TrainSettings, config: ModelConfig) -> bool:
    """Whether the run keeps the mean network's skip at its least-squares fit instead of
    training it: a skip wider than one voxel, in a residual-kind model started here (or
    resumed) with ``mean_init`` least-squares; not one fine-tuned from ``--init`` or started
    at the input, and not a 1×1 skip (trained, as before: its few weights do not drift).

    The fit is the best linear filter already; trained on, its many taps drifted with the
    optimizer's noise (Adam moves every weight about one learning rate per step whatever its
    gradient): on FlyEM isotropic ×4 a 7×7 skip ended 0.3 dB below the same skip kept fixed
    (benchmarks/quality/READING.md, fourteenth session)."""
    wide = config.residual and config.mean_net.skip_size > 1
    return wide and s.mean_init == "least-squares" and s.init is None


def check_patch(s: TrainSettings, config: ModelConfig) -> None:
    """The patch side must suit the network (its downsampling, its mean network's skip) and
    the scale factor."""
    multiple = math.lcm(config.multiple, config.xy_scale)
    if s.patch % multiple:
        raise InputError(
            f"--patch {s.patch} must be a multiple of {multiple} for this model; "
            f"try --patch {-(-s.patch // multiple) * multiple}"
        )
    fitted = config.residual and s.init is None and s.mean_init == "least-squares"
    skip = config.mean_net.skip_size if fitted else 1
    if s.patch < skip:  # the skip is fitted on the voxels whose window lies inside a patch
        smallest = -(-skip // multiple) * multiple
        raise InputError(
            f"--patch {s.patch} is narrower than the mean network's {skip}-voxel skip; "
            f"try --patch {smallest}"
        )


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def make_optimizer(
    net: torch.nn.Module, s: TrainSettings, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over ``net``'s parameters with the run's learning rate and weight decay, as one
    fused kernel per step where torch has it (CPU, CUDA): the per-parameter loop cost 8 % of
    a tiny model's step on 2 CPU cores (``benchmarks/results/train_step.md``)."""
    fused = True if device.type in FUSED_DEVICES else None
    return torch.optim.AdamW(
        net.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999), fused=fused
    )


__all__ = [
    "split_data", "build_dataset", "build_config", "build_net", "load_init", "check_patch",
    "fit_mean_skip", "skip_is_fixed", "SKIP_FIT_PATCHES", "resolve_objective", "resolve_z_context",
    "make_optimizer", "FUSED_DEVICES",
]  # fmt: skip
