"""Checkpoints that load without executing code.

A checkpoint is one ``.safetensors`` file: the network's (EMA) weights, and the
:class:`~emdiffuse.models.variants.ModelConfig` as JSON in the file's metadata (key
``emdiffuse_config``). Next to it, ``<stem>.json`` holds the same config for people to read.

Loading never unpickles. ``.pt``/``.pth`` files are read with
``torch.load(weights_only=True)``, which refuses any pickled object other than tensors and
plain containers; their config comes from a ``"config"`` entry or the ``<stem>.json`` sidecar.
Every problem — unreadable or truncated file, missing config, weights that do not fit the
architecture, a model for another task or scale factor — is an :class:`InputError` that
names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

from emdiffuse.errors import InputError
from emdiffuse.models.torch_files import load_tensor_mapping
from emdiffuse.models.variants import ModelConfig

CONFIG_KEY = "emdiffuse_config"
FORMAT_KEY = "format"
FORMAT = "emdiffuse-checkpoint/1"
TORCH_SUFFIXES = (".pt", ".pth")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The human-readable JSON config next to a checkpoint: ``<stem>.json``."""
    return Path(path).with_suffix(".json")


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> Path:
    """Write ``state_dict`` and ``config`` to ``path`` (.safetensors) and ``<stem>.json``.

    Tensors are stored as they are (dtype and values bit-exact), made contiguous and
    un-shared. Returns the checkpoint path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"checkpoint path {path} must end in .safetensors")
    if not isinstance(config, ModelConfig):
        raise TypeError("config must be a ModelConfig")
    config.validate()
    check_state_dict(config, state_dict)
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()
    }
    text = config.to_json(indent=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: text, FORMAT_KEY: FORMAT})
    os.replace(tmp, path)
    sidecar_path(path).write_text(config.to_json(indent=2) + "\n")
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expect_task: str | None = None,
    expect_variant: str | None = None,
    expect_scale_factor: int | None = None,
    config: ModelConfig | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint: ``(config, state_dict)`` with tensors on the CPU.

    ``expect_task`` / ``expect_variant`` / ``expect_scale_factor`` refuse a model made for
    something else. ``config`` overrides the stored config (e.g. for a bare ``.pth``).
    """
    config, state_dict, _ = read_checkpoint(path, config=config)
    check_expected(
        config,
        expect_task=expect_task,
        expect_variant=expect_variant,
        expect_scale_factor=expect_scale_factor,
    )
    return config, state_dict


def read_checkpoint(
    path: str | os.PathLike, *, config: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """``(config, state_dict, sha256)`` from one read of the file: the weights are parsed
    from exactly the bytes that ``sha256`` identifies (a cache keyed on it is never stale,
    even if the file is replaced while it is read)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise InputError(f"checkpoint {path} is not a file")
    data = path.read_bytes()
    if path.suffix in TORCH_SUFFIXES:
        stored, state_dict = _read_torch(path, data)
    else:
        stored, state_dict = _read_safetensors(path, data)
    if config is None:
        config = stored if stored is not None else _read_sidecar(path)
    check_state_dict(config, state_dict, where=str(path))
    return config, state_dict, hashlib.sha256(data).hexdigest()


def check_expected(
    config: ModelConfig,
    *,
    expect_task: str | None = None,
    expect_variant: str | None = None,
    expect_scale_factor: int | None = None,
) -> None:
    """Refuse a model made for another task, variant or scale factor."""
    if expect_task is not None and config.task != expect_task:
        raise InputError(
            f"checkpoint is {config.describe()} but this run asks for {expect_task}; "
            f"use a {expect_task} checkpoint"
        )
    if expect_variant is not None and config.variant != expect_variant:
        raise InputError(
            f"checkpoint is {config.describe()} but this run asks for {expect_variant}; "
            f"use a {expect_variant} checkpoint"
        )
    if expect_scale_factor is not None and config.scale_factor != int(expect_scale_factor):
        raise InputError(
            f"checkpoint is {config.describe()} (scale factor {config.scale_factor}) but this "
            f"run asks for scale factor {expect_scale_factor}; use a matching checkpoint"
        )


def check_state_dict(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    where: str = "state_dict",
    what: str | None = None,
    key_prefix: str = "",
    unexpected: Sequence[str] = (),
    hint: str = "the file was written for another architecture",
) -> None:
    """Refuse weights that do not fit ``config.unet``: missing or unexpected keys, shapes.

    Messages name ``where`` (the file), ``what`` (the config; default ``config.describe()``)
    and each bad key as it is stored (``key_prefix`` + our name), and end with ``hint``.
    ``unexpected`` adds keys already found to be foreign (e.g. outside the network)."""
    expected = expected_shapes(config)
    bad = [name for name, t in state_dict.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise InputError(f"{where}: entries that are not tensors: {name_list(bad)}")
    missing = [key_prefix + name for name in expected if name not in state_dict]
    extra = [*unexpected, *(key_prefix + name for name in state_dict if name not in expected)]
    head = f"{where}: weights do not match the config ({what or config.describe()})"
    if extra:  # first: they name what the file has and the config lacks
        raise InputError(f"{head}: {len(extra)} unexpected key(s) {name_list(extra)}; {hint}")
    if missing:
        raise InputError(f"{head}: {len(missing)} missing key(s) {name_list(missing)}; {hint}")
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise InputError(
                f"{head}: {key_prefix}{name} has shape {list(got)}, the config needs "
                f"{list(shape)}; {hint}"
            )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the network's state dict, built without allocating memory (the
    residual kind: ``mean.*`` and ``residual.*``)."""
    from emdiffuse.models.networks import build_network  # networks imports diffusion

    with torch.device("meta"):
        net = build_network(config)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def name_list(names: list[str], limit: int = 4) -> str:
    """``a, b, c, d, … (+n)``: the first ``limit`` names of a list, for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def _read_safetensors(
    path: Path, data: bytes
) -> tuple[ModelConfig | None, dict[str, torch.Tensor]]:
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size]) if 0 < size <= len(data) - 8 else None
        if not isinstance(header, dict):
            raise ValueError("no safetensors header")
        metadata = header.get("__metadata__") or {}
        state_dict = load(data)
    except Exception as error:  # safetensors raises its own error types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"{path} is not a checkpoint: not a readable .safetensors file (corrupt or "
            f"truncated?): {reason}"
        ) from None
    text = metadata.get(CONFIG_KEY)
    config = None if text is None else ModelConfig.from_json(text)
    return config, state_dict


def _read_torch(path: Path, data: bytes) -> tuple[ModelConfig | None, dict[str, torch.Tensor]]:
    payload = load_tensor_mapping(
        path, "checkpoint", pickled_hint="Convert it to .safetensors.", data=data
    )
    config = None
    if "state_dict" in payload and isinstance(payload["state_dict"], Mapping):
        state_dict = dict(payload["state_dict"])
        raw = payload.get("config")
        if isinstance(raw, str):
            config = ModelConfig.from_json(raw)
        elif isinstance(raw, Mapping):
            config = ModelConfig.from_dict(raw)
    else:
        state_dict = dict(payload)
    return config, state_dict


def _read_sidecar(path: Path) -> ModelConfig:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise InputError(
            f"checkpoint {path} has no config (none in the file, no {sidecar.name} beside it); "
            "write it with save_checkpoint or put its JSON config next to it"
        )
    try:
        text = sidecar.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read config {sidecar}: {error}") from None
    return ModelConfig.from_json(text)


def config_from_file(path: str | os.PathLike) -> ModelConfig:
    """Only the config of a checkpoint (cheap: reads the safetensors header)."""
    path = Path(path)
    if path.suffix == ".json":
        return ModelConfig.from_json(path.read_text())
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                text = (handle.metadata() or {}).get(CONFIG_KEY)
        except Exception:
            raise InputError(
                f"{path} is not a checkpoint: not a readable .safetensors file (corrupt or "
                "truncated?)"
            ) from None
        if text is not None:
            return ModelConfig.from_json(text)
    return load_checkpoint(path)[0]


__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "check_state_dict",
    "check_expected",
    "config_from_file",
    "sidecar_path",
    "expected_shapes",
]
