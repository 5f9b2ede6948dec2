"""Tiny checkpoints whose output depends on their input (a helper of the tests)."""

from __future__ import annotations

import torch

from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.enhancer import Enhancer


def perturbed_checkpoint(config, path, seed: int = 3) -> str:
    """A checkpoint of ``config`` whose zero-initialised layers get random weights (a fresh
    network's last layers are zero: its output would not depend on its input)."""
    state = dict(Enhancer.from_config(config, seed=seed).net.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    for name, t in state.items():
        if t.is_floating_point() and t.ndim == 4 and not t.any():
            state[name] = 0.05 * torch.randn(t.shape, generator=generator)
    return str(save_checkpoint(path, state, config))
