"""Progress of a run for logs that are not a terminal.

On a terminal the run shows a live bar (tqdm, or distributed's). Written to a file — a SLURM or
PBS log, a notebook cell captured to disk — a live bar is a frame every 0.1 s (about 1 700 for
a 3-minute run). :class:`LineProgress` instead prints one plain line at most every
``every_fraction`` of the chunks or ``every_seconds``, whichever comes first, and at the end:
chunks done, percent, output Mvoxel/s and the estimated time left.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a live bar makes sense there)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LineProgress:
    """Plain progress lines over ``total`` chunks holding ``voxels`` output voxels together.

    ``update(n)`` counts finished chunks; a line is printed when the count has moved by at
    least ``every_fraction`` of ``total`` since the last line, or ``every_seconds`` have
    passed, and when the last chunk is done.
    """

    def __init__(
        self,
        total: int,
        voxels: int | None = None,
        *,
        stream: TextIO | None = None,
        every_fraction: float = 0.05,
        every_seconds: float = 60.0,
        clock=time.monotonic,
    ) -> None:
        self.total = max(0, int(total))
        self.voxels = voxels
        self.stream = sys.stderr if stream is None else stream
        self.step = max(1, math.ceil(every_fraction * self.total))
        self.every_seconds = every_seconds
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.printed_at = (0, self.start)
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        count, when = self.printed_at
        now = self.clock()
        if (
            self.done == self.total
            or self.done - count >= self.step
            or now - when >= self.every_seconds
        ):
            self._print(now)

    def line(self, now: float) -> str:
        """The progress line at time ``now``."""
        elapsed = max(now - self.start, 1e-9)
        parts = [f"chunks {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f} %)"]
        if self.voxels and self.total:
            rate = self.voxels * self.done / self.total / elapsed / 1e6
            parts.append(f"{rate:.3g} Mvoxel/s")
        if 0 < self.done < self.total:
            left = elapsed * (self.total - self.done) / self.done
            parts.append(f"ETA {_duration(left)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.printed_at = (self.done, now)
        self.lines += 1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


__all__ = ["LineProgress", "is_terminal"]
