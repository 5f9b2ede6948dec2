"""A training run's state on disk: resumable checkpoints and the final model.

``out/checkpoints/step_00000100.pt`` holds everything a run needs to continue exactly:
the weights, the EMA weights, the optimizer, torch's RNG states, the config, the settings,
the normalisation and the elapsed time (``torch.save`` of tensors and plain containers only,
read back with ``weights_only=True``). ``out/model.safetensors`` is the final EMA model
(:func:`emdiffuse.models.checkpoints.save_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from emdiffuse.errors import InputError
from emdiffuse.models.checkpoints import save_checkpoint
from emdiffuse.models.ema import EMA
from emdiffuse.training.settings import TrainSettings

log = logging.getLogger(__name__)

FINAL_NAME = "model.safetensors"


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: Path, step: int) -> Path:
    return checkpoint_dir(out) / f"step_{step:08d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint of the highest step in ``out``, or None."""
    found = sorted(checkpoint_dir(out).glob("step_*.pt"))
    return found[-1] if found else None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a partial file never carries the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state, read without executing code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(
            f"cannot resume from {path}: {type(error).__name__}; delete it to use the one before"
        ) from None


def resume_state(out: Path, s: TrainSettings) -> dict[str, Any] | None:
    """The latest checkpoint's state in ``out`` (None when there is none), refused when its
    settings differ from ``s`` in a field a resumed run must keep."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    state = load_state(ckpt)
    saved = json.loads(state["settings"])
    name = s.resume_mismatch(saved)
    if name is not None:
        raise InputError(
            f"--resume: {name} was {saved.get(name)!r} in {ckpt.name} but is "
            f"{getattr(s, name)!r} now; use the same settings to resume"
        )
    log.info("resuming from %s (step %d)", ckpt, int(state["step"]))
    return state


def _cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def make_state(
    step: int,
    net: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    config,
    s: TrainSettings,
    normalization: dict[str, float],
    device: torch.device,
    elapsed: float,
    condition_normalization: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Everything that continues the run from ``step`` (module docstring): ``normalization``
    is the target's range, ``condition_normalization`` the condition's."""
    return {
        "step": int(step),
        "model": _cpu(net),
        "ema": _cpu(ema.module),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "config": config.to_json(indent=None),
        "settings": s.to_json(indent=None),
        "normalization": dict(normalization),
        "condition_normalization": dict(condition_normalization or normalization),
        "data": {"seed": s.seed, "next_step": int(step), "batch_size": s.batch_size},
        "elapsed": float(elapsed),
    }


def saved_normalization(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's (condition, target) ranges as ``{"condition", "target"}``; a checkpoint
    from before the split holds one range, used for both (as that run did)."""
    target = dict(state["normalization"])
    return {"condition": dict(state.get("condition_normalization") or target), "target": target}


def restore(
    state: dict[str, Any],
    net: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> None:
    """Put a checkpoint's weights, EMA, optimizer and RNG states back (before moving to
    ``device``)."""
    net.load_state_dict(state["model"])
    ema.load_module_state(state["ema"], int(state["step"]))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def move_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """The optimizer's state tensors onto ``device``. Step counters stay where they are,
    except in a fused or capturable group, whose kernels read them on the parameters' device."""
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            for k, v in optimizer.state.get(param, {}).items():
                if isinstance(v, torch.Tensor) and (k != "step" or on_device):
                    optimizer.state[param][k] = v.to(device)


def save_final(out: Path, ema: EMA, config) -> Path:
    """``out/model.safetensors``: the EMA weights and the config."""
    path = Path(out) / FINAL_NAME
    save_checkpoint(path, _cpu(ema.module), config)
    log.info("wrote %s", path)
    return path


__all__ = [
    "FINAL_NAME", "checkpoint_dir", "checkpoint_path", "latest_checkpoint", "save_state",
    "load_state", "resume_state", "make_state", "saved_normalization", "restore", "move_optimizer", "save_final",
]  # fmt: skip
