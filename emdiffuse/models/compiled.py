"""``torch.compile`` for inference at one batch size: one compiled graph per tile shape.

A compiled network specialises on its input shapes, and compiling takes tens of seconds. A
run's tiles come in batches of ``batch_size`` with a smaller last batch per task; compiling
each size anew would cost more than it saves. :class:`FixedBatch` pads a smaller batch with
copies of its last item up to the run's batch size (:meth:`FixedBatch.reserve`) or the
largest batch it has run, and cuts the output back, so a run compiles each network once per
tile shape. The items of a batch never mix (the networks have no batch statistics), so
padding changes no output beyond the float rounding that batched kernels have anyway.

On one H200, compiling the reference UNet made it 2.9× faster in bf16 (1 462 evaluations/s
of 256² tiles at batch 64 against 503 eager; benchmarks/results/gpu_bf16_compile.md).
"""

from __future__ import annotations

import threading
from typing import Any

import torch


class FixedBatch:
    """``module`` compiled with static shapes, called at the reserved batch size or the
    largest batch seen so far, whichever is larger.

    ``shapes``: the input shapes the compiled module has been called with (one per tile
    shape and batch size; padding keeps it to one per tile shape unless a batch larger than
    every earlier one arrives).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.compiled = torch.compile(module, dynamic=False)
        self.batch = 0
        self.shapes: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        """Pad every later batch to at least ``n`` items (a run's batch size: its first
        call may be a smaller one, e.g. a pilot's, and would otherwise compile at that
        size and again at the full one)."""
        with self._lock:
            self.batch = max(self.batch, int(n))

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = int(x.shape[0])
        with self._lock:
            self.batch = max(self.batch, n)
            pad = self.batch - n
            x, args, kwargs = (_pad(x, n, pad), tuple(_pad(a, n, pad) for a in args),
                               {k: _pad(v, n, pad) for k, v in kwargs.items()})  # fmt: skip
            shape = tuple(x.shape)
            if shape not in self.shapes:  # compiles: once, while other threads wait
                out = self.compiled(x, *args, **kwargs)
                self.shapes.add(shape)
                return out[:n]
        return self.compiled(x, *args, **kwargs)[:n]


def _pad(value: Any, n: int, pad: int) -> Any:
    """``value`` with ``pad`` copies of its last item appended when it is a batch of ``n``
    (a tensor whose first axis is ``n``); 1-D tensors (noise levels, often an expanded
    scalar) made contiguous so the compiled graph sees one layout."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != n:
        return value
    if pad:
        value = torch.cat([value, value[-1:].expand(pad, *value.shape[1:])])
    return value.contiguous() if value.ndim == 1 else value


__all__ = ["FixedBatch"]
