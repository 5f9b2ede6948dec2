"""The one exponential moving average of a network's weights (the trainer's, the reference's).

:class:`EMA` keeps the average as a module of its own (a deep copy of the network, frozen
and in eval mode: no dropout, normalisation from its running statistics): ``module`` is what
validation and the end-of-training calibration sample with and what a training run saves. Each
:meth:`EMA.update` does ``avg = decay * avg + (1 - decay) * param`` for every parameter (one
fused ``lerp``) and copies the buffers. With ``warmup`` (default) the decay after ``n``
updates is ``min(decay, (1 + n) / (10 + n))``, so short runs leave the random initialisation.

Resuming: the training checkpoints store ``module.state_dict()`` (key ``"ema"``) and the
step; :meth:`EMA.load_module_state` restores both, and the resumed average is bit-identical
to an uninterrupted run's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from emdiffuse.errors import InputError


def warmup_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based) with warm-up: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA:
    """Exponential moving average of ``model``'s parameters; buffers copied (module docstring)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise InputError(f"EMA decay {decay!r} must lie in [0, 1)")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()  # it never trains: evaluate it as enhance does
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    # ---- the average ---------------------------------------------------------------------
    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name."""
        return {k: v.detach() for k, v in self.module.named_parameters()}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The buffers copied at the last update, by name."""
        return {k: v.detach() for k, v in self.module.named_buffers()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        return warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current parameters into the average; copy its buffers."""
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay())
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights (and the latest buffers) into ``model``."""
        model.load_state_dict(self.module.state_dict())

    def averaged(self, model: nn.Module | None = None) -> nn.Module:
        """A deep copy holding the averaged weights (of ``model``'s class: the tracked one's)."""
        del model  # the average is a module already; kept for the call sites' symmetry
        return copy.deepcopy(self.module)

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": self.shadow, "buffers": self.buffers}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.load_module_state({**state["shadow"], **state["buffers"]}, self.num_updates)

    @torch.no_grad()
    def load_module_state(self, module_state: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore the average from a module state dict (a training checkpoint's ``"ema"``)
        after ``updates`` updates (the checkpoint's step)."""
        self.module.load_state_dict(dict(module_state))
        self.num_updates = int(updates)


__all__ = ["EMA", "warmup_decay"]
