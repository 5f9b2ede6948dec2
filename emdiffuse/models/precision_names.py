"""The precision names, without torch: the one list the CLI, the run settings, the training
settings and :func:`emdiffuse.models.device.autocast_dtype` take their choices from."""

from __future__ import annotations

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")  # inference
TRAIN_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")  # training: fp16 needs loss scaling

__all__ = ["PRECISIONS", "TRAIN_PRECISIONS"]
