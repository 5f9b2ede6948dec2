"""Import checkpoints written by the reference EMDiffuse code (Luchixiang/EMDiffuse).

The reference trainer saves ``<epoch>_Network.pth`` and ``<epoch>_Network_ema.pth``: the
``state_dict`` of its ``Network`` module, whose UNet sits under ``denoise_fn.`` and which, once
a noise schedule was set, also carries the schedule's buffers (``gammas``,
``posterior_mean_coef1``, ...). Its JSON config (with ``//`` comments) describes the UNet under
``model.which_networks[0].args.unet`` and the schedules under ``...args.beta_schedule``.

:func:`load_reference_checkpoint` reads both (the config through
:mod:`emdiffuse.models.reference_config`), without executing any code
(``torch.load(weights_only=True)``), and returns ``(ModelConfig, state_dict)`` ready for
:class:`~emdiffuse.models.unet.UNet`; :func:`convert_reference_checkpoint` writes our
``.safetensors`` checkpoint (``emdiffuse import-reference`` on the command line).

What the import maps, and why:

* **Which weights.** The reference saves ``<epoch>_Network.pth`` (``netG``) and
  ``<epoch>_Network_ema.pth`` (its moving average); its test phase loads both but samples
  only with ``netG``. Both import; :func:`reference_weights_kind` tells them apart by name,
  and the ``*_Network.pth`` file is the one that reproduces the reference's results.
* **Networks.** ``models.EMDiffuse_network`` (2D UNet, conditioning concatenated to the noisy
  target) gives ``emdiffuse-n`` or ``emdiffuse-r``; ``models.vEMDiffuse_network`` (the same 2D
  UNet plus an embedded in-between-slice index, the reference's ``unet_3d.py``; it is not a 3D
  network) gives ``vemdiffuse-i`` or ``vemdiffuse-a`` in index-embedding mode.
* **Variant and scale factor.** The reference config does not say whether a 2D network
  denoises or super-resolves (both use task ``denoise``), nor the super-resolution factor.
  The variant is taken from the experiment name (``EMDiffuse-n…``, ``EMDiffuse-r…``,
  ``vEMDiffuse-i…``, ``vEMDiffuse-a…``, or the vEMDiffuse dataset's ``method``) unless given;
  the z factor from the training dataset's ``z_times``. Pass ``variant`` / ``scale_factor``
  where the config cannot tell.
* **Intensities.** The reference reads 8-bit images and maps them to [-1, 1] as
  ``x / 127.5 - 1`` (``ToTensor`` then ``Normalize(0.5, 0.5)``), fixed, with no percentiles:
  ``normalization`` becomes ``{"low": 0, "high": 255}`` unless given.
* **Noise level.** Its network is fed ``gammas`` (alpha-bar), as ours; prediction is epsilon.
  The training schedule (``beta_schedule.train``) becomes ``ModelConfig.schedule``; the
  inference schedule (``beta_schedule.test``, 1000 steps, β 1e-4…0.09 in the published
  configs), which its test phase samples on, becomes ``ModelConfig.inference_schedule``, so
  ``ddpm`` at that schedule's full length walks the reference's alpha-bars step for step.
* **Slice order (vEMDiffuse).** The reference's conditioning is (slice *below*, slice *above*):
  the deeper slice first. Ours is in increasing z (see :mod:`emdiffuse.models.variants`), so
  the import swaps the two conditioning input channels of the first convolution; the network
  then computes exactly what the reference computes with its own order. The embedded index
  ``i`` is the ``i``-th slice below the upper one in both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.checkpoints import (
    check_state_dict,
    expected_shapes,
    name_list,
    save_checkpoint,
    sidecar_path,
)
from emdiffuse.models.diffusion import Schedule
from emdiffuse.models.reference_config import (
    config_from_reference,
    read_reference_config,
    strip_json_comments,
)
from emdiffuse.models.torch_files import load_tensor_mapping
from emdiffuse.models.variants import ModelConfig

# Buffers the reference's Network registers when it sets a noise schedule: not weights.
SCHEDULE_BUFFERS = frozenset(
    {
        "gammas",
        "sqrt_recip_gammas",
        "sqrt_recipm1_gammas",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
def reference_weights_kind(path: str | os.PathLike) -> str:
    """Which of the reference's two saved networks ``path`` is, by its file name: ``"netG"``
    (``*_Network.pth``: the trained network, which the reference's test phase samples with),
    ``"ema"`` (``*_Network_ema.pth``: the moving average, saved but never used to sample) or
    ``"unknown"``."""
    name = Path(path).name
    if name.endswith("_Network_ema.pth") or name == "Network_ema.pth":
        return "ema"
    if name.endswith("_Network.pth") or name == "Network.pth":
        return "netG"
    return "unknown"


def describe_reference_weights(path: str | os.PathLike) -> str:
    """One line: which kind of reference weights ``path`` holds and whether they give the
    reference's own result."""
    name = Path(path).name
    kind = reference_weights_kind(path)
    if kind == "netG":
        return (
            f"{name} is the reference's netG, the weights its test phase samples with: "
            "--sampler ddpm --steps <the inference schedule's length> reproduces its result"
        )
    if kind == "ema":
        twin = name[: -len("_ema.pth")] + ".pth"
        return (
            f"{name} is the reference's EMA copy, which its test phase never samples with; "
            f"for the reference's own result import {twin}"
        )
    return (
        f"{name} is not named *_Network.pth (netG, what the reference samples with) or "
        "*_Network_ema.pth (its unused EMA copy): which weights these are is unknown"
    )


def read_reference_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict of a reference ``*_Network(_ema).pth``, read without running code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference checkpoint {path} does not exist or is not a file")
    payload = load_tensor_mapping(path, "reference checkpoint")
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping):
        raise InputError(f"reference checkpoint {path} does not hold a dict of tensors")
    bad = [str(k) for k, v in payload.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(
            f"reference checkpoint {path}: entries that are not tensors: {name_list(bad)}"
        )
    return {str(k): v for k, v in payload.items()}


def convert_reference_state_dict(
    raw: Mapping[str, torch.Tensor],
    config: ModelConfig,
    *,
    other_schedules: Sequence[Mapping[str, Any]] = (),
    where: str = "reference checkpoint",
) -> dict[str, torch.Tensor]:
    """The reference's ``Network`` state dict -> our UNet's (checked against ``config``).

    Strips ``module.`` (DataParallel / DistributedDataParallel) and ``denoise_fn.`` prefixes,
    drops the noise-schedule buffers (after checking them against ``config.schedule`` or one
    of ``other_schedules``, e.g. the reference's inference schedule) and, for vEMDiffuse,
    reorders the conditioning inputs to increasing z.
    """
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        stripped[key] = tensor
    has_prefix = any(key.startswith("denoise_fn.") for key in stripped)
    weights: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in stripped.items():
        if key in SCHEDULE_BUFFERS:
            buffers[key] = tensor
        elif key == "n_averaged":  # torch.optim.swa_utils.AveragedModel
            continue
        elif has_prefix and key.startswith("denoise_fn."):
            weights[key[len("denoise_fn.") :]] = tensor
        elif has_prefix:
            unexpected.append(key)
        else:
            weights[key] = tensor
    check_state_dict(
        config,
        weights,
        where=where,
        what=f"{config.describe()}, {_architecture(config)}",
        key_prefix="denoise_fn." if has_prefix else "",
        unexpected=unexpected,
        hint="is the JSON the one these weights were trained with?",
    )
    _check_schedule(buffers.get("gammas"), config, other_schedules, where)
    out = {key: weights[key].detach().clone().contiguous() for key in expected_shapes(config)}
    if config.use_index_embedding:
        first = "input_blocks.0.0.weight"
        # reference: (deeper slice, upper slice, noisy target); ours: (upper, deeper, noisy)
        out[first] = out[first][:, [1, 0, *range(2, out[first].shape[1])]].contiguous()
    return out


def _check_schedule(
    gammas: torch.Tensor | None,
    config: ModelConfig,
    other_schedules: Sequence[Mapping[str, Any]],
    where: str,
) -> None:
    """Refuse weights whose saved schedule is none of the config's schedules."""
    if gammas is None:
        return
    saved = gammas.detach().to(torch.float64).reshape(-1)
    for spec in (config.schedule, *other_schedules):
        candidate = Schedule.from_dict(spec).alpha_bars
        if saved.numel() == candidate.numel() and torch.allclose(
            saved, candidate, rtol=1e-4, atol=1e-7
        ):
            return
    ours = Schedule.from_dict(config.schedule).alpha_bars
    raise InputError(
        f"{where}: the noise schedule saved with the weights ({saved.numel()} steps, gammas "
        f"{float(saved[0]):.3g}..{float(saved[-1]):.3g}) is not the config's training schedule "
        f"({config.schedule['kind']} over {config.schedule['steps']} steps, "
        f"{float(ours[0]):.3g}..{float(ours[-1]):.3g}); give the JSON these weights were "
        "trained with"
    )


def _architecture(config: ModelConfig) -> str:
    u = config.unet
    return (
        f"inner_channel {u.base_channels}, channel_mults {list(u.channel_mults)}, "
        f"res_blocks {u.num_res_blocks}"
    )


# --------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------
def load_reference_checkpoint(
    pth: str | os.PathLike,
    json_path: str | os.PathLike,
    *,
    variant: str | None = None,
    scale_factor: int | None = None,
    normalization: Mapping[str, float] | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a reference ``*_Network.pth`` / ``*_Network_ema.pth`` and its JSON config.

    Args:
        pth: the reference's saved network (weights only; pickled code is refused).
        json_path: the reference's config the weights were trained with.
        variant: see :func:`config_from_reference`.
        scale_factor: see :func:`config_from_reference`.
        normalization: see :func:`config_from_reference`.

    Returns:
        ``(config, state_dict)``: ``UNet(config.unet).load_state_dict(state_dict)`` gives a
        network whose outputs match the reference's for the same inputs (vEMDiffuse
        conditioning in increasing z, see the module docstring).
    """
    opt = read_reference_config(json_path)
    config = config_from_reference(
        opt,
        variant=variant,
        scale_factor=scale_factor,
        normalization=normalization,
        where=f"reference config {Path(json_path).name}",
        file_name=Path(json_path).stem,
    )
    raw = read_reference_weights(pth)
    # a network saved outside training may carry the inference schedule's buffers
    others = [] if config.inference_schedule is None else [config.inference_schedule]
    state_dict = convert_reference_state_dict(
        raw, config, other_schedules=others, where=f"reference checkpoint {Path(pth).name}"
    )
    name = Path(pth).name
    kind = {"netG": "netG", "ema": "EMA copy", "unknown": "kind unknown"}[reference_weights_kind(pth)]
    config = config.replace(training_data=f"{config.training_data} (weights {name}: {kind})")
    return config, state_dict


def convert_reference_checkpoint(
    pth: str | os.PathLike,
    json_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    variant: str | None = None,
    scale_factor: int | None = None,
    normalization: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Import a reference checkpoint and write it as our ``.safetensors`` (plus ``.json``).

    Refuses an existing ``out`` unless ``overwrite``, and an ``out`` (or its ``.json``
    sidecar) that is one of the inputs. Returns the written path.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"output {out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise InputError(f"output {out} exists; pass overwrite (--overwrite) to replace it")
    for written in (out, sidecar_path(out)):  # never write over an input
        for read in (Path(pth), Path(json_path)):
            if written.resolve() == read.resolve():
                raise InputError(
                    f"output {written} is the input {read}; choose another output name"
                )
    config, state_dict = load_reference_checkpoint(
        pth, json_path, variant=variant, scale_factor=scale_factor, normalization=normalization
    )
    return save_checkpoint(out, state_dict, config)


__all__ = [
    "load_reference_checkpoint",
    "convert_reference_checkpoint",
    "reference_weights_kind",
    "describe_reference_weights",
    "config_from_reference",
    "convert_reference_state_dict",
    "read_reference_config",
    "read_reference_weights",
    "strip_json_comments",
]
