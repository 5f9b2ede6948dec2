"""The run's scalars: ``scalars.csv`` (and TensorBoard event files when it is installed).

One row per logged step (loss, learning rate, gradient norm every 10 steps; validation
PSNR/SSIM of one sample, of the one-evaluation posterior mean and of the input alone;
elapsed seconds). A resumed run keeps the
rows up to its checkpoint's step and continues the file.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

CSV_FIELDS = [
    "step", "loss", "lr", "grad_norm", "val_psnr", "val_ssim", "val_psnr_mean", "val_ssim_mean",
    "val_psnr_input", "val_ssim_input", "elapsed_s",
]  # fmt: skip


class Scalars:
    """Writes scalar rows (a no-op on ranks other than 0: ``enabled=False``)."""

    def __init__(self, out: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "scalars.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step > 0 and self.path.exists():
            with self.path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = _tensorboard(out, resume_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {k: "" for k in CSV_FIELDS}
        row.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()})
        row["step"] = step
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(out: Path, resume_step: int):
    """A TensorBoard writer, or None when the package is not there."""
    try:  # lazy: tensorboard is optional and slow to import
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)
    except Exception:  # noqa: BLE001 - no TensorBoard: the CSV alone
        log.debug("TensorBoard not available; scalars go to %s only", out / "scalars.csv")
        return None


__all__ = ["Scalars", "CSV_FIELDS"]
