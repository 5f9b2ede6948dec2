"""Read the reference EMDiffuse's JSON configs (Luchixiang/EMDiffuse) into a ModelConfig.

The reference's JSON config (with ``//`` comments) describes the UNet under
``model.which_networks[0].args.unet`` and the schedules under ``...args.beta_schedule``;
:func:`config_from_reference` maps it to our :class:`~emdiffuse.models.variants.ModelConfig`
(what it maps and why: :mod:`emdiffuse.models.reference`, which imports the weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emdiffuse.errors import InputError
from emdiffuse.models.config_fields import check_schedule
from emdiffuse.models.unet import UNetConfig
from emdiffuse.models.variants import VARIANTS, ModelConfig

# Reference network modules -> is it the vEMDiffuse (index embedding) network?
NETWORK_MODULES = {"models.EMDiffuse_network": False, "models.vEMDiffuse_network": True}
# The reference UNet's arguments -> ours (None: accepted, no effect on the weights or outputs).
UNET_ARGUMENTS: dict[str, str | None] = {
    "image_size": "image_size",
    "in_channel": "in_channels",
    "inner_channel": "base_channels",
    "out_channel": "out_channels",
    "res_blocks": "num_res_blocks",
    "attn_res": "attention_resolutions",
    "dropout": "dropout",
    "channel_mults": "channel_mults",
    "num_heads": "num_heads",
    "num_head_channels": "num_head_channels",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
    "use_new_attention_order": None,  # -> legacy_attention_order, inverted
    "conv_resample": None,  # checked: only the learned resampling is supported
    "num_heads_upsample": None,  # checked: must equal num_heads
    "use_checkpoint": None,  # gradient checkpointing: memory only
    "use_fp16": None,  # unused by the reference's forward pass
    "transfer": None,  # gradient checkpointing switch: memory only
}
# The reference UNet's defaults where they differ from ours.
UNET_DEFAULTS: dict[str, Any] = {
    "dropout": 0.0,
    "channel_mults": (1, 2, 4, 8),
    "num_heads": 1,
    "num_head_channels": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}
LOSSES = {"mse_loss": "mse", "l1_loss": "l1"}
# The reference maps 8-bit intensities 0..255 to [-1, 1].
REFERENCE_NORMALIZATION = {"low": 0.0, "high": 255.0}
NAME_PREFIXES = ("train_", "test_", "debug_", "finetune_")


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
def strip_json_comments(text: str) -> str:
    """``text`` without ``//`` line comments (and ``/* */`` blocks), strings left intact."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def read_reference_config(path: str | os.PathLike) -> dict[str, Any]:
    """The reference's JSON config (``//`` comments allowed) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference config {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read reference config {path}: {error}") from None
    try:
        opt = json.loads(strip_json_comments(text))
    except json.JSONDecodeError as error:
        raise InputError(
            f"reference config {path} is not valid JSON (line {error.lineno}: {error.msg}); "
            "give the EMDiffuse config (config/*.json) the weights were trained with"
        ) from None
    if not isinstance(opt, dict):
        raise InputError(f"reference config {path} does not hold a JSON object")
    return opt


def _get(opt: Mapping[str, Any], *keys: Any) -> Any:
    """``opt[k0][k1]...`` or None where any level is missing."""
    node: Any = opt
    for key in keys:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return None
    return node


def _network_spec(opt: Mapping[str, Any], where: str) -> tuple[bool, dict[str, Any]]:
    """(is the vEMDiffuse network, its ``args``) from ``model.which_networks[0]``."""
    network = _get(opt, "model", "which_networks", 0)
    if not isinstance(network, Mapping):
        raise InputError(
            f"{where}: no model.which_networks[0] entry; give the EMDiffuse training config "
            "(config/EMDiffuse-*.json or vEMDiffuse-*.json) the weights were trained with"
        )
    name = network.get("name")
    module = name[0] if isinstance(name, list) and len(name) == 2 else name
    if module not in NETWORK_MODULES:
        raise InputError(
            f"{where}: unsupported network {name!r} in model.which_networks[0].name; "
            f"supported: {', '.join(NETWORK_MODULES)}"
        )
    args = network.get("args")
    if not isinstance(args, Mapping) or not isinstance(args.get("unet"), Mapping):
        raise InputError(f"{where}: model.which_networks[0].args.unet is missing")
    return NETWORK_MODULES[module], dict(args)


def config_args(opt: Mapping[str, Any]) -> dict[str, Any]:
    """``model.which_networks[0].args`` of a reference config (empty if absent)."""
    args = _get(opt, "model", "which_networks", 0, "args")
    return dict(args) if isinstance(args, Mapping) else {}


def _unet_config(unet: Mapping[str, Any], index: bool, num_indices: int, where: str) -> UNetConfig:
    unknown = sorted(set(unet) - set(UNET_ARGUMENTS))
    if unknown:
        raise InputError(
            f"{where}: unsupported UNet option(s) {', '.join(unknown)} in "
            "model.which_networks[0].args.unet; this importer knows "
            f"{', '.join(sorted(UNET_ARGUMENTS))}"
        )
    for required in ("in_channel", "inner_channel", "out_channel", "res_blocks", "attn_res"):
        if required not in unet:
            raise InputError(f"{where}: the UNet config has no {required!r}")
    values = dict(UNET_DEFAULTS)
    values.update(unet)
    if not values["resblock_updown"] and not values.get("conv_resample", True):
        raise InputError(
            f"{where}: unsupported UNet option resblock_updown false with conv_resample false "
            "(parameter-free resampling); only learned resampling imports"
        )
    upsample_heads = values.get("num_heads_upsample", -1)
    if values["num_head_channels"] == -1 and upsample_heads not in (-1, values["num_heads"]):
        raise InputError(
            f"{where}: unsupported UNet option num_heads_upsample {upsample_heads} different "
            f"from num_heads {values['num_heads']}"
        )
    kwargs: dict[str, Any] = {
        ours: values[theirs]
        for theirs, ours in UNET_ARGUMENTS.items()
        if ours is not None and theirs in values
    }
    for key in ("channel_mults", "attention_resolutions"):
        if not isinstance(kwargs[key], (list, tuple)):
            raise InputError(f"{where}: UNet {key} must be a list, got {kwargs[key]!r}")
    kwargs["legacy_attention_order"] = not values.get("use_new_attention_order", False)
    kwargs.update(dims=2, norm_groups=None, use_index_embedding=index)
    if index:
        kwargs["num_indices"] = num_indices
    try:
        return UNetConfig(**kwargs)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    except TypeError as error:
        raise InputError(f"{where}: bad UNet config ({error})") from None


def reference_schedule(args: Mapping[str, Any], where: str, phase: str = "train") -> dict[str, Any]:
    train = _get(args, "beta_schedule", phase)
    if not isinstance(train, Mapping):
        raise InputError(f"{where}: no beta_schedule.{phase} in model.which_networks[0].args")
    kind = train.get("schedule")
    steps = train.get("n_timestep")

    def number(key: str, default: float) -> float:
        value = train.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(
                f"{where}: beta_schedule.{phase}.{key} must be a number, got {value!r}"
            )
        return float(value)

    if kind == "linear":
        out = {
            "kind": "linear",
            "steps": steps,
            "beta_start": number("linear_start", 1e-6),
            "beta_end": number("linear_end", 1e-2),
        }
    elif kind == "cosine":
        out = {"kind": "cosine", "steps": steps, "s": number("cosine_s", 8e-3)}
    else:
        raise InputError(
            f"{where}: unsupported noise schedule {kind!r} (beta_schedule.{phase}.schedule); "
            "this importer supports linear and cosine"
        )
    if isinstance(steps, float) and steps.is_integer():
        out["steps"] = int(steps)
    return out


def _experiment_name(opt: Mapping[str, Any]) -> str:
    name = str(opt.get("name") or "")
    for prefix in NAME_PREFIXES:  # the reference prefixes the phase when it saves its config
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _named_variant(text: str) -> str | None:
    """The variant a name starts with (``EMDiffuse-n-big`` -> ``emdiffuse-n``), or None."""
    text = text.lower()
    for prefix in NAME_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.replace("_", "-")
    for variant in VARIANTS:
        if text.startswith(variant):
            return variant
    return None


def _guess_variant(opt: Mapping[str, Any], index: bool, where: str, file_name: str = "") -> str:
    """The variant from the network's shapes (the index-embedding vEMDiffuse network or the
    2D one) and, where those cannot tell, the experiment name, the vEMDiffuse dataset's
    ``method`` and the config's file name; refused where these disagree."""
    name = _named_variant(_experiment_name(opt))
    shown = repr(opt.get("name"))
    if index:
        method = _get(opt, "datasets", "train", "which_dataset", "args", "method")
        for candidate in (_named_variant(str(method or "")), name, _named_variant(file_name)):
            if candidate in ("vemdiffuse-i", "vemdiffuse-a"):
                return candidate
        raise InputError(
            f"{where}: cannot tell vEMDiffuse-i from vEMDiffuse-a (experiment name {shown}, "
            "no dataset method); pass variant (--variant vemdiffuse-i or vemdiffuse-a)"
        )
    shapes = (
        "a 2D EMDiffuse network (in_channel 2, out_channel 1) has the same shapes for "
        "denoising and super-resolution, and both train on its denoise dataset"
    )
    if name in ("vemdiffuse-i", "vemdiffuse-a"):
        raise InputError(
            f"{where}: the experiment name {shown} says vEMDiffuse but the network is the 2D "
            f"EMDiffuse one; {shapes}: pass --variant emdiffuse-n, or emdiffuse-r with "
            "--scale-factor"
        )
    from_file = _named_variant(file_name)
    if name and from_file in ("emdiffuse-n", "emdiffuse-r") and from_file != name:
        raise InputError(
            f"{where}: the experiment name {shown} says {name} but the file name says "
            f"{from_file}, and the network cannot decide ({shapes}; the published "
            "EMDiffuse-n-big.json is a denoiser named 'EMDiffuse-r'); pass --variant "
            "emdiffuse-n, or emdiffuse-r with --scale-factor"
        )
    if name in ("emdiffuse-n", "emdiffuse-r"):
        return name
    raise InputError(
        f"{where}: the reference config does not say whether this network denoises or "
        f"super-resolves (experiment name {shown}; {shapes}); pass variant "
        "(--variant emdiffuse-n or emdiffuse-r)"
    )


def config_from_reference(
    opt: Mapping[str, Any],
    *,
    variant: str | None = None,
    scale_factor: int | None = None,
    normalization: Mapping[str, float] | None = None,
    where: str = "reference config",
    file_name: str = "",
) -> ModelConfig:
    """Our :class:`ModelConfig` for a reference EMDiffuse config (as from
    :func:`read_reference_config`).

    Args:
        opt: the reference config.
        variant: ``emdiffuse-n|emdiffuse-r|vemdiffuse-i|vemdiffuse-a``; default: from the
            experiment name (or the vEMDiffuse dataset's ``method``).
        scale_factor: super-resolution xy factor (required for ``emdiffuse-r``, which the
            reference config does not record) or the vEMDiffuse z factor (default: the training
            dataset's ``z_times``; a different value is refused).
        normalization: raw ``{"low", "high"}`` mapped to [-1, 1]; default 0 and 255, as the
            reference (8-bit images).
        where: how messages name the config.
        file_name: the config's file name; where the experiment name says otherwise (the
            published ``EMDiffuse-n-big.json`` is named ``EMDiffuse-r``) the variant must
            be given.
    """
    if not isinstance(opt, Mapping):
        raise InputError(f"{where}: expected a JSON object")
    index, args = _network_spec(opt, where)
    if variant is None:
        variant = _guess_variant(opt, index, where, file_name)
    variant = str(variant).lower()
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    task = VARIANTS[variant]
    if index != (task == "isotropic"):
        network = "vEMDiffuse (index embedding)" if index else "EMDiffuse (2D)"
        raise InputError(
            f"{where}: variant {variant} does not fit the config's {network} network; use "
            f"{'vemdiffuse-i or vemdiffuse-a' if index else 'emdiffuse-n or emdiffuse-r'}"
        )
    if not index and args.get("norm", True) is False:
        raise InputError(
            f"{where}: unsupported option norm false in model.which_networks[0].args (the "
            "reference then clamps its estimates to [0, 1]); only norm true imports"
        )
    k = _scale_factor(opt, task, scale_factor, where)
    unet = _unet_config(args["unet"], index, k - 1 if index else 0, where)
    expected_in = 3 if index else 2
    if unet.in_channels != expected_in or unet.out_channels != 1:
        raise InputError(
            f"{where}: the UNet has in_channel {unet.in_channels} and out_channel "
            f"{unet.out_channels}; the reference {'vEMDiffuse' if index else 'EMDiffuse'} "
            f"network needs {expected_in} and 1"
        )
    losses = _get(opt, "model", "which_losses") or ["mse_loss"]
    first = losses[0] if isinstance(losses, list) and losses else losses
    first = first.get("name") if isinstance(first, Mapping) else first
    if first not in LOSSES:
        raise InputError(f"{where}: unsupported loss {first!r}; supported: {', '.join(LOSSES)}")
    name = _experiment_name(opt) or "?"
    test = None
    if _get(args, "beta_schedule", "test") is not None:
        test = reference_schedule(args, where, phase="test")
        try:
            check_schedule(test, "beta_schedule.test")
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
    note = f"imported from reference EMDiffuse experiment {name!r}"
    return ModelConfig(
        variant=variant,
        task=task,
        scale_factor=k,
        unet=unet,
        schedule=reference_schedule(args, where),
        prediction="eps",
        loss=LOSSES[first],
        normalization=dict(normalization or REFERENCE_NORMALIZATION),
        voxel_size_nm=None,
        training_data=note,
        use_index_embedding=index,
        cond_upsample="bilinear",  # the reference enlarges its input with PIL's bilinear resize
        inference_schedule=test,  # what the reference's test phase samples on
    )


def _scale_factor(opt: Mapping[str, Any], task: str, given: int | None, where: str) -> int:
    if given is not None and (isinstance(given, bool) or not isinstance(given, int)):
        raise InputError(f"scale_factor must be an integer, got {given!r}")
    if task == "denoise":
        if given not in (None, 1):
            raise InputError(f"scale_factor {given} given for a denoiser; leave it out")
        return 1
    if task == "super-resolve":
        if given is None:
            raise InputError(
                f"{where}: the reference config does not record the super-resolution factor; "
                "pass scale_factor (--scale-factor), e.g. 2 (the reference's own test "
                "preparation crops 128-pixel patches that its data loader resizes to 256)"
            )
        return given
    z_times = None
    for phase in ("train", "test"):
        z_times = _get(opt, "datasets", phase, "which_dataset", "args", "z_times")
        if z_times is not None:
            break
    if z_times is not None and (isinstance(z_times, bool) or not isinstance(z_times, int)):
        raise InputError(f"{where}: z_times must be an integer, got {z_times!r}")
    if given is None:
        if z_times is None:
            raise InputError(
                f"{where}: no z_times in the dataset arguments; pass scale_factor "
                "(--scale-factor), the z subsampling factor the network was trained for"
            )
        return z_times
    if z_times is not None and given != z_times:
        raise InputError(
            f"{where}: scale_factor {given} given but the network was trained for z_times "
            f"{z_times} (its index embedding knows slices 0..{z_times - 2}); use {z_times}"
        )
    return given


__all__ = [
    "config_from_reference", "config_args", "read_reference_config", "reference_schedule",
    "strip_json_comments", "REFERENCE_NORMALIZATION",
]  # fmt: skip
