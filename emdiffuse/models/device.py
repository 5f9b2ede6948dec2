"""The one device resolver: ``auto``/``cpu``/``cuda``/``cuda:N`` -> a checked ``torch.device``,
and the one precision resolver: ``auto``/``fp32``/``bf16``/``fp16`` -> an autocast dtype.

Used by the Enhancer (inference), the trainer (one GPU per rank) and the pipeline's workers
(one GPU per Dask worker): each passes the index it would pick among several GPUs (the rank,
the worker's number) and gets the same validation and the same error message.

``auto`` precision is bf16 autocast wherever the hardware multiplies bf16 matrices natively:
a CUDA GPU with bf16 (else fp16 for inference), or a CPU whose oneDNN kernels compute bf16 in
hardware: Intel AMX tiles (Xeon Sapphire Rapids and later; measured 1.5x per training step,
benchmarks/results/cpu_bf16.md) or AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper
Lake; 1.4x per training step, 1.7x per 8-step sample, benchmarks/results/cpu_bf16_avx512.md);
plain fp32 elsewhere, where emulated bf16 would be slower.
"""

from __future__ import annotations

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.precision_names import PRECISIONS, TRAIN_PRECISIONS

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device = "auto", *, index: int | None = None) -> torch.device:
    """The torch device for ``device``.

    ``auto`` is a GPU when one is available, else the CPU. A GPU without an explicit number
    (``auto`` or ``cuda``) takes ``index % device_count`` (``index``: a rank or worker
    number; 0 when None). Raises :class:`~emdiffuse.errors.InputError` for an unknown name
    or a GPU that is not there.
    """
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not (name == "cpu" or name.startswith("cuda")):
        raise InputError(f"unknown device {device!r}; use {DEVICE_CHOICES}")
    try:
        resolved = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"unknown device {device!r} ({error}); use {DEVICE_CHOICES}") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise InputError(f"device {device} asked for but no CUDA GPU is available; use --device cpu")
    count = torch.cuda.device_count()
    if resolved.index is None:
        return torch.device("cuda", (index or 0) % count)
    if resolved.index >= count:
        raise InputError(
            f"device {device} asked for but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1}); "
            "pass one of those as --device"
        )
    return resolved


def cpu_bf16_hardware() -> str | None:
    """The bf16 instructions of this CPU that torch's oneDNN backend uses: ``"AMX"`` (Intel
    AMX tiles), ``"AVX512-BF16"`` (bf16 dot products in AVX-512), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported():
            return name
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (:func:`cpu_bf16_hardware`)."""
    return cpu_bf16_hardware() is not None


def autocast_dtype(
    precision: str, device: torch.device, *, choices: tuple[str, ...] = PRECISIONS
) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, or None for plain fp32 (see the
    module docstring for ``auto``). ``choices``: the names the caller accepts (training
    passes :data:`TRAIN_PRECISIONS`); another raises :class:`~emdiffuse.errors.InputError`."""
    if precision not in choices:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(choices)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if "fp16" in choices else None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


__all__ = ["resolve_device", "DEVICE_CHOICES", "PRECISIONS", "TRAIN_PRECISIONS",
           "cpu_bf16_hardware", "cpu_has_native_bf16", "autocast_dtype"]  # fmt: skip
