"""The one device resolver: ``auto``/``cpu``/``cuda``/``cuda:N`` -> a checked ``torch.device``.

Used by the Enhancer (inference), the trainer (one GPU per rank) and the pipeline's workers
(one GPU per Dask worker): each passes the index it would pick among several GPUs (the rank,
the worker's number) and gets the same validation and the same error message.
"""

from __future__ import annotations

import torch

from emdiffuse.errors import InputError

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


__all__ = ["resolve_device", "DEVICE_CHOICES"]
