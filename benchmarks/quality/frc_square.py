"""Whether a single sample's FRC against the truth is the square of the posterior mean's.

An exact posterior sample is S = M + R: the posterior mean M plus texture R that, given the
input, is independent of the truth T, with power such that the sample's spectrum is the
truth's (var M + var R = var T per frequency ring). Its correlation with the truth is then
var M / var T = FRC(M, T)², so a sample crosses the 1/7 threshold where the mean's FRC falls
to √(1/7) ≈ 0.38 and resolves less than the mean (and than a regression such as CARE)
wherever the mean's FRC stays above that. This script reads a quality run's FRC curves
(``quality.json``: the rows "mean (1 NFE)" and "1 sample" of each emdiffuse model) and
measures how close the sample's curve is to the mean's squared, over the upper half of the
frequencies.

    python benchmarks/quality/frc_square.py QUALITY.json [QUALITY.json ...]

Writes ``results/quality/frc_square.{json,md,png}`` (``--out``, ``--name``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import start_record  # noqa: E402

THRESHOLD = 1.0 / 7.0
UPPER = 0.25  # cycles per voxel: the upper half of the frequencies up to Nyquist (0.5)


def crossing(freq: np.ndarray, frc: np.ndarray, threshold: float = THRESHOLD) -> float:
    """The first frequency (cycles per voxel) where ``frc`` falls below ``threshold``; 0.5
    (Nyquist) when it never does."""
    below = np.nonzero(frc < threshold)[0]
    return float(freq[below[0]]) if below.size else 0.5


def compare(mean: dict, sample: dict) -> dict:
    """The sample's FRC curve against the mean's and the mean's squared (``freq``, ``frc``
    lists as the quality run stores them)."""
    f = np.asarray(mean["freq"], dtype=np.float64)
    m = np.asarray(mean["frc"], dtype=np.float64)
    s = np.asarray(sample["frc"], dtype=np.float64)
    upper = f >= UPPER
    return {
        "freq": f.tolist(),
        "mean": m.tolist(),
        "sample": s.tolist(),
        "upper_mean_frc": float(m[upper].mean()),
        "upper_sample_frc": float(s[upper].mean()),
        "upper_mean_squared": float((m[upper] ** 2).mean()),
        "upper_abs_sample_minus_mean_squared": float(np.abs(s[upper] - m[upper] ** 2).mean()),
        "upper_abs_sample_minus_mean": float(np.abs(s[upper] - m[upper]).mean()),
        "crossing_mean": crossing(f, m),
        "crossing_sample": crossing(f, s),
        "crossing_mean_squared": crossing(f, m**2),
    }


def levels_of(quality: dict) -> dict[str, dict]:
    """Every level of a quality run with both a mean and a single-sample row of one emdiffuse
    model (the first such model of the level: vEMDiffuse-i before vEMDiffuse-a)."""
    out = {}
    for key, level in quality["levels"].items():
        models: dict[str, dict] = {}
        for r in level["rows"]:
            if r.get("group") == "emdiffuse" and r.get("frc_curve"):
                models.setdefault(r["method"], {})[r["mode"]] = r
        for method, rows in models.items():
            if "mean (1 NFE)" in rows and "1 sample" in rows:
                out[key] = {"method": method, **compare(rows["mean (1 NFE)"]["frc_curve"],
                                                        rows["1 sample"]["frc_curve"])}  # fmt: skip
                break
    return out


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [
        "# A single sample's FRC against the truth is the square of the posterior mean's",
        "",
        f"Command: `{prov['command']}`, commit `{(prov['git']['commit'] or '')[:10]}`; curves "
        f"from `{result['source']}`. Upper band: {UPPER}–0.5 cycles per voxel. Crossings of "
        "the 1/7 threshold in cycles per voxel (0.5 = Nyquist: never below).",
        "",
        "| level | model | mean FRC (upper) | sample FRC (upper) | mean² (upper) | abs(sample − mean²) "
        "| abs(sample − mean) | crossing: mean / sample / mean² |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, c in result["levels"].items():
        lines.append(
            f"| {key} | {c['method']} | {c['upper_mean_frc']:.3f} | {c['upper_sample_frc']:.3f} | "
            f"{c['upper_mean_squared']:.3f} | {c['upper_abs_sample_minus_mean_squared']:.3f} | "
            f"{c['upper_abs_sample_minus_mean']:.3f} | {c['crossing_mean']:.3f} / "
            f"{c['crossing_sample']:.3f} / {c['crossing_mean_squared']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["levels"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        c = result["levels"][key]
        f, m = np.asarray(c["freq"]), np.asarray(c["mean"])
        ax.plot(f, m, label="posterior mean")
        ax.plot(f, c["sample"], label="one sample")
        ax.plot(f, m**2, "--", label="mean²")
        ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("cycles / voxel")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("FRC against the truth")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("quality", type=Path, nargs="+", help="quality runs' quality.json files")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                   / "results" / "quality")  # fmt: skip
    p.add_argument("--name", default="frc_square")
    args = p.parse_args(argv)
    missing = [str(q) for q in args.quality if not q.exists()]
    if missing:
        p.error(f"{', '.join(missing)} not found; run benchmarks/quality/run.py first")
    record = start_record(__file__, argv)
    levels = {}
    for quality in args.quality:
        levels.update(levels_of(json.loads(quality.read_text())))
    if not levels:
        p.error("no level has both a mean and a 1-sample emdiffuse row")
    result = {"benchmark": "frc_square", "provenance": record,
              "source": ", ".join(str(q) for q in args.quality), "levels": levels}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    figure(result, args.out / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
