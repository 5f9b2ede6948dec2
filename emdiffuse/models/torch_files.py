"""Reading model ``.pth`` / ``.pt`` files without executing code: where our checkpoint and the
reference-checkpoint loaders call ``torch.load`` (always ``weights_only=True``) and turn its
failures into one-line :class:`~emdiffuse.errors.InputError` messages."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emdiffuse.errors import InputError


def load_tensor_mapping(path: Path, label: str, *, pickled_hint: str = "") -> Mapping[str, Any]:
    """The mapping stored in the torch file ``path`` (tensors, numbers, strings only).

    ``label`` names the file in messages ("checkpoint", "reference checkpoint");
    ``pickled_hint`` is appended to the refusal of a file holding other pickled objects.
    """
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
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


__all__ = ["load_tensor_mapping"]
