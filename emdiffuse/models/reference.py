"""Import checkpoints written by the reference EMDiffuse code (Luchixiang/EMDiffuse).

The reference trainer saves ``<epoch>_Network.pth`` and ``<epoch>_Network_ema.pth``: the
``state_dict`` of its ``Network`` module, whose UNet sits under ``denoise_fn.`` and which, once
a noise schedule was set, also carries the schedule's buffers (``gammas``,
``posterior_mean_coef1``, ...). Its JSON config (with ``//`` comments) describes the UNet under
``model.which_networks[0].args.unet`` and the schedules under ``...args.beta_schedule``.

:func:`load_reference_checkpoint` reads both, without executing any code
(``torch.load(weights_only=True)``), and returns ``(ModelConfig, state_dict)`` ready for
:class:`~emdiffuse.models.unet.UNet`; :func:`convert_reference_checkpoint` writes our
``.safetensors`` checkpoint (``emdiffuse import-reference`` on the command line).

What the import maps, and why:

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
  The training schedule (``beta_schedule.train``) becomes ``ModelConfig.schedule``.
* **Slice order (vEMDiffuse).** The reference's conditioning is (slice *below*, slice *above*):
  the deeper slice first. Ours is in increasing z (see :mod:`emdiffuse.models.variants`), so
  the import swaps the two conditioning input channels of the first convolution; the network
  then computes exactly what the reference computes with its own order. The embedded index
  ``i`` is the ``i``-th slice below the upper one in both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.torch_files import load_tensor_mapping
from emdiffuse.models.unet import UNetConfig
from emdiffuse.models.variants import VARIANTS, ModelConfig

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


def _schedule(args: Mapping[str, Any], where: str, phase: str = "train") -> dict[str, Any]:
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


def _guess_variant(opt: Mapping[str, Any], index: bool, where: str) -> str:
    name = _experiment_name(opt).lower()
    if index:
        method = _get(opt, "datasets", "train", "which_dataset", "args", "method")
        for candidate in (str(method or "").lower(), name):
            for variant in ("vemdiffuse-i", "vemdiffuse-a"):
                if candidate.startswith(variant):
                    return variant
        raise InputError(
            f"{where}: cannot tell vEMDiffuse-i from vEMDiffuse-a (experiment name "
            f"{opt.get('name')!r}); pass variant (--variant vemdiffuse-i or vemdiffuse-a)"
        )
    for variant in ("emdiffuse-n", "emdiffuse-r"):
        if name.startswith(variant):
            return variant
    raise InputError(
        f"{where}: the reference config does not say whether this network denoises or "
        f"super-resolves (experiment name {opt.get('name')!r}); pass variant "
        "(--variant emdiffuse-n or emdiffuse-r)"
    )


def config_from_reference(
    opt: Mapping[str, Any],
    *,
    variant: str | None = None,
    scale_factor: int | None = None,
    normalization: Mapping[str, float] | None = None,
    where: str = "reference config",
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
    """
    if not isinstance(opt, Mapping):
        raise InputError(f"{where}: expected a JSON object")
    index, args = _network_spec(opt, where)
    if variant is None:
        variant = _guess_variant(opt, index, where)
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
    test = _get(args, "beta_schedule", "test")
    note = f"imported from reference EMDiffuse experiment {name!r}"
    if isinstance(test, Mapping):
        note += (
            f"; its inference schedule: {test.get('schedule')} over {test.get('n_timestep')} "
            f"steps, betas {test.get('linear_start')}..{test.get('linear_end')}"
        )
    return ModelConfig(
        variant=variant,
        task=task,
        scale_factor=k,
        unet=unet,
        schedule=_schedule(args, where),
        prediction="eps",
        loss=LOSSES[first],
        normalization=dict(normalization or REFERENCE_NORMALIZATION),
        voxel_size_nm=None,
        training_data=note,
        use_index_embedding=index,
        cond_upsample="bilinear",  # the reference enlarges its input with PIL's bilinear resize
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


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
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
            f"reference checkpoint {path}: entries that are not tensors: {_names(bad)}"
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
    from emdiffuse.models.checkpoints import check_state_dict, expected_shapes

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
    from emdiffuse.models.diffusion import Schedule

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


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


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
    from emdiffuse.models.diffusion import Schedule

    opt = read_reference_config(json_path)
    config = config_from_reference(
        opt,
        variant=variant,
        scale_factor=scale_factor,
        normalization=normalization,
        where=f"reference config {Path(json_path).name}",
    )
    raw = read_reference_weights(pth)
    others = []
    try:  # a network saved outside training may carry the inference schedule
        test = _schedule(config_args(opt), "", phase="test")
        Schedule.from_dict(test)
        others.append(test)
    except InputError:
        pass
    state_dict = convert_reference_state_dict(
        raw, config, other_schedules=others, where=f"reference checkpoint {Path(pth).name}"
    )
    name = Path(pth).name
    config = config.replace(training_data=f"{config.training_data} (weights {name})")
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
    from emdiffuse.models.checkpoints import save_checkpoint, sidecar_path

    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"output {out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise InputError(f"output {out} exists; pass overwrite (--overwrite) to replace it")
    for written in (out, sidecar_path(out)):  # never write over an input
        for read in (Path(pth), Path(json_path)):
            if written.resolve() == read.resolve():
                raise InputError(f"output {written} is the input {read}; choose another output name")
    config, state_dict = load_reference_checkpoint(
        pth, json_path, variant=variant, scale_factor=scale_factor, normalization=normalization
    )
    return save_checkpoint(out, state_dict, config)


__all__ = [
    "load_reference_checkpoint",
    "convert_reference_checkpoint",
    "config_from_reference",
    "convert_reference_state_dict",
    "read_reference_config",
    "read_reference_weights",
    "strip_json_comments",
]
