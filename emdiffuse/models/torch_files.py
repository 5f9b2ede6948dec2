"""Reading model ``.pth`` / ``.pt`` files without executing code: where our checkpoint and the
reference-checkpoint loaders call ``torch.load`` (always ``weights_only=True``) and turn its
failures into one-line :class:`~emdiffuse.errors.InputError` messages."""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emdiffuse.errors import InputError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format


def is_torch_file(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts a torch file: a zip archive, or the
    legacy format, whose first pickle is torch's magic number (PROTO n, LONG1 of 10 bytes)."""
    legacy = len(head) >= 4 and head[0] == 0x80 and head[2:4] == b"\x8a\x0a"
    return head.startswith(ZIP_MAGIC) or legacy


def load_tensor_mapping(
    path: Path, label: str, *, pickled_hint: str = "", data: bytes | None = None
) -> Mapping[str, Any]:
    """The mapping stored in the torch file ``path`` (tensors, numbers, strings only).

    ``label`` names the file in messages ("checkpoint", "reference checkpoint");
    ``pickled_hint`` is appended to the refusal of a file holding other pickled objects.
    ``data``: the file's bytes, already read (they are parsed instead of the file).
    """
    if data is None:
        with open(path, "rb") as handle:
            head = handle.read(8)
    else:
        head = data[:8]
    if not is_torch_file(head):
        raise InputError(
            f"{path} is not a {label}: it is not a torch file (it starts with neither a zip "
            "nor a pickle header); check that the path names the model file"
        )
    source = io.BytesIO(data) if data is not None else str(path)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0] if str(error) else ""
        hint = f" {pickled_hint}" if pickled_hint else ""
        raise InputError(
            f"{label} {path} holds pickled objects that are not plain tensors; refusing to "
            f"load it (it could run code).{hint} ({first})"
        ) from None
    except Exception as error:
        raise InputError(
            f"{label} {path} is not a readable torch file (corrupt or truncated?): "
            f"{type(error).__name__}"
        ) from None
    if not isinstance(payload, Mapping):
        raise InputError(f"{label} {path} does not hold a dict of tensors")
    return payload


__all__ = ["is_torch_file", "load_tensor_mapping"]
