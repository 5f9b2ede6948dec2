"""Where a process's time goes: seconds per pipeline stage, summed over the tasks it ran.

The task bodies (:mod:`~emdiffuse.pipeline.tasks`) time their stages with :func:`timed`
(two ``perf_counter`` calls and a locked dict update: 4 µs measured on a loaded 2-core
machine, a few dozen times per task, about 0.1 ms against the 300 ms of a default tile task
with a network that costs nothing; so it is always on). Stages:

In the processes that run tasks:

- ``read``: input regions read from the store (the tiles' region with its context);
- ``normalise``: the input region mapped into model space;
- ``gather``: tiles cut from the region (reflection padding) and stacked into a batch;
- ``noise``: the starting noise of each tile (counter-based, keyed on its global origin);
- ``network``: the Enhancer's calls (the sampler's loop, its step noise, the network);
- ``blend``: window-weighted tile sums, the chunk's blend, mean and spread, the cast to the
  output dtype (isotropic runs: with the read of the kept input slices);
- ``write``: the chunk's region writes and its done marker;
- ``tile_task``, ``chunk_task``: whole tasks (:func:`~emdiffuse.pipeline.tasks.produce_block`,
  :func:`~emdiffuse.pipeline.tasks.run_chunk`), their stages and the rest.

In the process that calls :func:`~emdiffuse.pipeline.enhance.enhance`: ``prepare`` (checks,
intensity ranges, lattice), ``correlation`` (the residual correlation measured on a few
tiles, when the model's calibration does not give it: :mod:`~emdiffuse.pipeline.correlation`),
``graph`` (building it), ``execute`` (the graph's run, wall
time) and ``pyramid`` (the pyramid levels and metadata, built after the last chunk).

:func:`stage_seconds` reads a process's totals (on a Dask cluster: ``client.run``),
:func:`reset_stages` zeroes them. ``counts`` say how often each stage ran.
"""

from __future__ import annotations

import threading
import time

STAGES = ("read", "normalise", "gather", "noise", "network", "blend", "write")
TASKS = ("tile_task", "chunk_task")

_LOCK = threading.Lock()
_SECONDS: dict[str, float] = {}
_COUNTS: dict[str, int] = {}


def add_seconds(stage: str, seconds: float) -> None:
    """Add ``seconds`` to ``stage`` of this process."""
    with _LOCK:
        _SECONDS[stage] = _SECONDS.get(stage, 0.0) + seconds
        _COUNTS[stage] = _COUNTS.get(stage, 0) + 1


class timed:  # noqa: N801 - used as a context manager, named like one
    """``with timed("read"): ...`` adds the block's wall time to stage ``read``."""

    __slots__ = ("stage", "start")

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __enter__(self) -> timed:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        add_seconds(self.stage, time.perf_counter() - self.start)


def stage_seconds() -> dict[str, dict[str, float]]:
    """This process's totals: ``{"seconds": {stage: s}, "counts": {stage: n}}``."""
    with _LOCK:
        return {"seconds": dict(_SECONDS), "counts": dict(_COUNTS)}


def reset_stages() -> None:
    """Zero this process's totals."""
    with _LOCK:
        _SECONDS.clear()
        _COUNTS.clear()
