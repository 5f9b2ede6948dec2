"""RAFT optical flow (torchvision) from a local weights file; nothing is ever downloaded.

Loaded models are cached on the file's content identity (path, inode, size, modification
time), so a file replaced in place is read again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from emdiffuse.errors import InputError

_RAFT_CACHE: dict[str, object] = {}


def load_raft(weights: str | Path):
    """A torchvision RAFT (large or small) with the weights of a local file; never downloads.

    Raises ``InputError`` if the file is missing, torchvision is not importable, or the file
    is not a RAFT state dict.
    """
    path = Path(weights)
    if not path.is_file():
        raise InputError(
            f"RAFT weights {weights} not found; give a local .pth/.safetensors file, or use --method flow"
        )
    stat = path.stat()  # content identity, not the path: a file replaced in place is reloaded
    key = f"{path.resolve()}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    if key in _RAFT_CACHE:
        return _RAFT_CACHE[key]
    try:  # lazy: torchvision is optional (only --method raft needs it)
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError:
        raise InputError(
            "--method raft needs torchvision, which is not importable; pip install torchvision "
            "(matching your torch), or use --method flow"
        ) from None
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's input
        raise InputError(
            f"cannot read RAFT weights {weights} ({type(error).__name__}); give a RAFT state dict"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for build in (raft_large, raft_small):
        model = build(weights=None, progress=False)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            continue
        model.eval()
        _RAFT_CACHE[key] = model
        return model
    raise InputError(f"{weights} is not a torchvision RAFT (raft_large or raft_small) state dict")


def raft_flow(model, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Flow (2, y, x) of a RAFT ``model`` with ``fixed[r] ~ moving[r + d(r)]``."""

    def prep(image: np.ndarray) -> torch.Tensor:
        lo, hi = np.percentile(image, (0.5, 99.5))
        scaled = np.clip(2 * (image - lo) / max(hi - lo, 1e-6) - 1, -1, 1).astype(np.float32)
        return torch.from_numpy(scaled)[None, None].expand(1, 3, *image.shape)

    ny, nx = fixed.shape
    pad = (0, (-nx) % 8, 0, (-ny) % 8)
    first = F.pad(prep(fixed), pad, mode="replicate")
    second = F.pad(prep(moving), pad, mode="replicate")
    with torch.inference_mode():
        flows = model(first, second)
    flow = flows[-1][0, :, :ny, :nx].numpy()  # (dx, dy): first[p] ~ second[p + flow]
    return np.stack([flow[1], flow[0]]).astype(np.float32)


__all__ = ["load_raft", "raft_flow"]
