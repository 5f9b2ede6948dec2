"""How hard each axis of a FlyEM volume is to fill in: the isotropic volume's own answer to
whether vEMDiffuse-a's lateral training patches (rows along y, columns along x) look like
the axis it is applied along (z).

For each factor k and axis: the RMS error of the midpoint of two voxels k apart predicted as
their average (linear interpolation, scored at the middle voxel), and the RMS difference of
voxels k apart; each also as a ratio to z. A lateral axis with a ratio near 1 is as hard as
z; one well below 1 is easier, and a calibration fitted on it alone covers less along z.

    python benchmarks/quality/axis_difficulty.py [--volume PATH] [--factors 4 8]

Writes ``results/quality/axis_difficulty.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from quality_data import FLYEM_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import start_record  # noqa: E402

AXES = {"z": 0, "y": 1, "x": 2}


def axis_scores(volume: np.ndarray, k: int) -> dict[str, dict[str, float]]:
    """Per axis: ``midpoint_rms`` (the average of voxels k apart against the voxel halfway,
    k even) and ``difference_rms`` (voxels k apart), in the volume's units."""
    out = {}
    for name, axis in AXES.items():
        v = np.moveaxis(volume, axis, 0)  # a view: the axis first
        n = len(v)
        first, last, middle = v[: n - k], v[k:], v[k // 2 : n - k + k // 2]
        out[name] = {
            "midpoint_rms": float(np.sqrt(np.mean(((first + last) / 2 - middle) ** 2))),
            "difference_rms": float(np.sqrt(np.mean((last - first) ** 2))),
        }
    return out


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [
        "# How hard each axis is to fill in (FlyEM, the isotropic training volume)",
        "",
        f"Command: `{prov['command']}`, commit `{(prov['git']['commit'] or '')[:10]}`; "
        f"volume `{result['volume']}` {result['shape']} (zyx, 10 nm isotropic), grey / 255.",
        "",
        "RMS error of linear interpolation at the midpoint of voxels k apart, and RMS difference "
        "of voxels k apart, per axis; 'to z' = the axis' value over z's.",
        "",
        "| k | axis | midpoint RMS | to z | difference RMS | to z |",
        "|---|---|---|---|---|---|",
    ]
    for k, scores in result["factors"].items():
        z = scores["z"]
        for name, s in scores.items():
            lines.append(
                f"| {k} | {name} | {s['midpoint_rms']:.4f} | "
                f"{s['midpoint_rms'] / z['midpoint_rms']:.3f} | {s['difference_rms']:.4f} | "
                f"{s['difference_rms'] / z['difference_rms']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volume", type=Path, default=FLYEM_DIR / "training_sample1.tif")
    p.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                   / "results" / "quality")  # fmt: skip
    p.add_argument("--name", default="axis_difficulty")
    args = p.parse_args(argv)
    if not args.volume.exists():
        p.error(f"{args.volume} does not exist; see ../shared/data/flyem_fibsem/README")
    if any(k < 2 or k % 2 for k in args.factors):
        p.error("--factors must be even numbers >= 2 (a midpoint voxel between the pair)")
    record = start_record(__file__, argv)
    volume = tifffile.imread(args.volume).astype(np.float32) / np.float32(255.0)
    result = {
        "benchmark": "axis_difficulty",
        "provenance": record,
        "volume": args.volume.name,
        "shape": list(volume.shape),
        "factors": {str(k): axis_scores(volume, k) for k in args.factors},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
