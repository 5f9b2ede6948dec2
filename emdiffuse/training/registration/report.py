"""The quality report of a registration: per-slice cross-correlations, shifts and flow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RegistrationReport:
    """Quality of a registration, per z-slice.

    ``ncc_*`` are Pearson (zero-normalised) cross-correlations with the fixed image of the
    moving image before registration, after the rigid shift and after the flow (NaN for
    ``method="rigid"``), computed on the smoothed images (``smooth_sigma``) over the voxels
    that every stage maps from inside the moving image. ``shift`` (n, 2) is the rigid shift
    (dy, dx) in voxels; ``flow_p99`` the 99th percentile of the non-rigid displacement's
    length (voxels; on very noisy pairs a few tenths of a voxel of it are noise).
    """

    method: str
    shift: np.ndarray
    ncc_before: np.ndarray
    ncc_rigid: np.ndarray
    ncc_flow: np.ndarray
    flow_p99: np.ndarray
    solver: str = "ilk"
    extra: dict = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return len(self.ncc_before)

    @property
    def ncc_final(self) -> np.ndarray:
        """NCC after the last stage of the chosen method."""
        return self.ncc_rigid if self.method == "rigid" else self.ncc_flow

    def mean(self) -> dict[str, float]:
        """Means over slices (NaN slices, e.g. blank ones, are left out)."""

        def m(values: np.ndarray) -> float:
            values = np.asarray(values, dtype=float)
            finite = values[np.isfinite(values)]
            return float(finite.mean()) if finite.size else float("nan")

        return {
            "ncc_before": m(self.ncc_before),
            "ncc_rigid": m(self.ncc_rigid),
            "ncc_flow": m(self.ncc_flow),
            "shift_y": m(self.shift[:, 0]),
            "shift_x": m(self.shift[:, 1]),
            "flow_p99": m(self.flow_p99),
        }

    def to_dict(self) -> dict:
        """JSON-ready: method, per-slice lists and means."""
        return {
            "method": self.method,
            "solver": self.solver,
            "slices": [
                {
                    "z": z,
                    "shift_yx": [float(v) for v in self.shift[z]],
                    "ncc_before": float(self.ncc_before[z]),
                    "ncc_rigid": float(self.ncc_rigid[z]),
                    "ncc_flow": float(self.ncc_flow[z]),
                    "flow_p99": float(self.flow_p99[z]),
                }
                for z in range(self.n_slices)
            ],
            "mean": self.mean(),
            **self.extra,
        }

    def table(self, max_rows: int = 40) -> str:
        """A plain-text table, one row per slice (the middle ones elided past ``max_rows``) + mean."""

        def f(v: float, fmt: str = "{:8.4f}") -> str:
            return fmt.format(v) if math.isfinite(v) else f"{'-':>8}"

        head = f"{'z':>5} {'shift_y':>8} {'shift_x':>8} {'ncc_in':>8} {'ncc_rig':>8} {'ncc_flow':>8} {'flow_p99':>8}"
        lines = [head, "-" * len(head)]
        rows = list(range(self.n_slices))
        if len(rows) > max_rows:
            rows = rows[: max_rows // 2] + [-1] + rows[-max_rows // 2 :]
        for z in rows:
            if z < 0:
                lines.append(f"{'...':>5}")
                continue
            lines.append(
                f"{z:>5} {f(self.shift[z, 0], '{:8.2f}')} {f(self.shift[z, 1], '{:8.2f}')} "
                f"{f(self.ncc_before[z])} {f(self.ncc_rigid[z])} {f(self.ncc_flow[z])} "
                f"{f(self.flow_p99[z], '{:8.2f}')}"
            )
        mean = self.mean()
        lines.append("-" * len(head))
        lines.append(
            f"{'mean':>5} {f(mean['shift_y'], '{:8.2f}')} {f(mean['shift_x'], '{:8.2f}')} "
            f"{f(mean['ncc_before'])} {f(mean['ncc_rigid'])} {f(mean['ncc_flow'])} "
            f"{f(mean['flow_p99'], '{:8.2f}')}"
        )
        return "\n".join(lines)

    @classmethod
    def concat(cls, parts: Sequence[RegistrationReport]) -> RegistrationReport:
        """Join per-slice reports in z order."""
        first = parts[0]
        return cls(
            method=first.method,
            solver=first.solver,
            shift=np.concatenate([p.shift for p in parts]).reshape(-1, 2),
            ncc_before=np.concatenate([p.ncc_before for p in parts]),
            ncc_rigid=np.concatenate([p.ncc_rigid for p in parts]),
            ncc_flow=np.concatenate([p.ncc_flow for p in parts]),
            flow_p99=np.concatenate([p.flow_p99 for p in parts]),
        )


__all__ = ["RegistrationReport"]
