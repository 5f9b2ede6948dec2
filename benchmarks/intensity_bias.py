"""Intensity bias of every sampler: one shared intensity range against separate ones (issue 14).

    python benchmarks/intensity_bias.py [--steps 600] [--models sr3-union sr3 residual]
        [--train-shape 16 512 512] [--quick]

Trains the demo's denoiser (``DEMO_SETTINGS``, dose 2, the demo's synthetic training pair of
``DEMO_TRAIN_SHAPE``, or ``--train-shape``) through the shipping ``trainer.train`` for
``--steps`` steps, as:

* ``sr3-union``: the SR3 kind with ONE range for condition and target, the percentiles of
  noisy ∪ clean (what every model got before the split: the clean target lands in about
  [-0.83, -0.19] of model space);
* ``sr3``: the SR3 kind with separate ranges (the loader's default now);
* ``residual``: the mean-plus-residual kind (``objective="residual"``), separate ranges.

Each model enhances a held-out volume (4×256² at the demo's held-out origin, other noise)
with whole-slice tiles for every offered sampler (and the one-evaluation posterior mean), and
the result is scored on the raw scale against the clean volume: bias = mean(enhanced −
clean) / clean data range, PSNR and SSIM. Acceptance (issue 14): |bias| ≤ 1 % for every
sampler of the models with separate ranges.

Where a bias comes from: for the posterior mean (one evaluation) the benchmark also reports
the bias on four more held-out regions (8×256² each) with their clean mean next to the
training volume's, and the conditional bias per quintile of the clean intensity. At the
demo's dose (input PSNR ~2 dB) the posterior mean shrinks dark voxels up and bright ones
down; its global bias on a region is then set by how that region's intensities differ from
the training volume's.

Writes benchmarks/results/intensity_bias.{json,md} (with the provenance record).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import provenance

RESULTS = Path(__file__).parent / "results"
MODELS = ("sr3-union", "sr3", "residual")
HELD_OUT_SHAPE = (4, 256, 256)
# more held-out regions (8x256² each) for the posterior mean's bias: origins far from the
# training volume (origin 0) and from each other
REGIONS = ((10_000, 5_000, 5_000), (20_000, 0, 0), (0, 40_000, 0), (3_000, 3_000, 3_000))
# (label, sampler, steps, samples): samples 0 is the posterior mean (one evaluation)
SETTINGS = (
    ("mean", "dpmpp_2m", 1, 0),
    ("ddim@1", "ddim", 1, 1),
    ("dpmpp_2m@8", "dpmpp_2m", 8, 1),
    ("ddim@10", "ddim", 10, 1),
    ("dpmpp_2m_sde@10", "dpmpp_2m_sde", 10, 1),
    ("dpmpp_3m_sde@10", "dpmpp_3m_sde", 10, 1),
    ("ddpm@100", "ddpm", 100, 1),
    ("dpmpp_2m@8 mean of 4", "dpmpp_2m", 8, 4),
)
ACCEPT = 0.01


def union_range(noisy: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """The old shared range: percentiles of noisy and clean together."""
    from emdiffuse.models.normalization import robust_range

    return robust_range(np.concatenate([noisy.ravel(), clean.ravel()])).to_dict()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per model")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument(
        "--train-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="training volume (default: the demo's DEMO_TRAIN_SHAPE)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20 steps, 2 samplers: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    record = provenance()

    from emdiffuse import metrics
    from emdiffuse.demo import HELD_OUT_ORIGIN
    from emdiffuse.models.enhancer import Enhancer
    from emdiffuse.models.normalization import pair_from_model
    from emdiffuse.training.demo_model import DEMO_TRAIN_SHAPE, demo_pair, enhance_slices
    from emdiffuse.training.settings import DEMO_NOISE, DEMO_SETTINGS, demo_recipe
    from emdiffuse.training.trainer import train

    steps = 20 if args.quick else args.steps
    settings = SETTINGS[:3] if args.quick else SETTINGS
    train_shape = tuple(args.train_shape or DEMO_TRAIN_SHAPE)
    noisy, clean = demo_pair(train_shape, seed=args.seed, noise_seed=args.seed + 1)
    held_noisy, held_clean = demo_pair(HELD_OUT_SHAPE, origin=HELD_OUT_ORIGIN,
                                       seed=args.seed, noise_seed=args.seed + 101)  # fmt: skip
    regions = [(origin, *demo_pair((8, 256, 256), origin=origin, seed=args.seed,
                                   noise_seed=args.seed + 201)) for origin in REGIONS]  # fmt: skip
    data_range = float(held_clean.max() - held_clean.min())
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            objective = "residual" if name == "residual" else "diffusion"
            options = {**demo_recipe(objective), "val_every": steps, "ckpt_every": steps}
            norm = union_range(noisy, clean) if name == "sr3-union" else None
            start = time.perf_counter()
            path = train("denoise", [noisy, clean], Path(tmp) / name, steps=steps, seed=args.seed,
                         progress=False, voxel_size=[8.0, 8.0, 8.0], device="cpu",
                         normalization=norm, **options)  # fmt: skip
            seconds = time.perf_counter() - start
            enhancer = Enhancer.load(path)
            cond_norm, target_norm = pair_from_model(enhancer.config)
            clean_model = target_norm.forward(held_clean)
            rows = []
            for label, sampler, n_steps, samples in settings:
                t = time.perf_counter()
                out = enhance_slices(enhancer, held_noisy, sampler=sampler, steps=n_steps,
                                     samples=samples, seed=args.seed)  # fmt: skip
                rows.append({
                    "setting": label, "sampler": sampler, "steps": n_steps, "samples": samples,
                    "bias": float(np.mean(out.astype(np.float64) - held_clean)) / data_range,
                    "psnr": metrics.psnr(out, held_clean, data_range=data_range),
                    "ssim": metrics.ssim(out, held_clean, data_range=data_range),
                    "seconds": time.perf_counter() - t,
                })  # fmt: skip
                r = rows[-1]
                print(f"{name:>10} {label:>22}  bias {r['bias']:+.4f}  PSNR {r['psnr']:6.2f}  "
                      f"SSIM {r['ssim']:.3f}", flush=True)  # fmt: skip
            mean_out = enhance_slices(enhancer, held_noisy, samples=0, seed=args.seed)
            mean_regions = []
            for origin, r_noisy, r_clean in regions:
                out = enhance_slices(enhancer, r_noisy, samples=0, seed=args.seed)
                span = float(r_clean.max() - r_clean.min())
                mean_regions.append({
                    "origin": list(origin), "clean_mean": float(r_clean.mean()),
                    "bias": float(np.mean(out.astype(np.float64) - r_clean)) / span,
                })  # fmt: skip
            models.append({
                "mean_bias_by_clean_quintile": quintile_bias(mean_out, held_clean, data_range),
                "mean_bias_regions": mean_regions,
                "model": name, "objective": options["objective"], "train_seconds": seconds,
                "steps": steps, "condition_range": cond_norm.to_dict(),
                "target_range": target_norm.to_dict(),
                "clean_in_model_space": [float(np.percentile(clean_model, 0.5)),
                                         float(np.percentile(clean_model, 99.5))],
                "worst_abs_bias": max(abs(r["bias"]) for r in rows), "rows": rows,
            })  # fmt: skip
    passed = {
        m["model"]: m["worst_abs_bias"] <= ACCEPT for m in models if m["model"] != "sr3-union"
    }
    result = {
        "steps": steps, "demo_settings": DEMO_SETTINGS, "noise": DEMO_NOISE,
        "train_shape": list(train_shape), "train_clean_mean": float(clean.mean()),
        "held_out": {"origin": list(HELD_OUT_ORIGIN), "shape": list(HELD_OUT_SHAPE),
                     "clean_mean": float(held_clean.mean())},
        "noisy_psnr": metrics.psnr(held_noisy, held_clean, data_range=data_range),
        "accept_abs_bias": ACCEPT, "passed": passed, "models": models, "provenance": record,
    }  # fmt: skip
    md = report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"intensity_bias{suffix}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"intensity_bias{suffix}.md").write_text(md)
    print(md)
    return 0 if all(passed.values()) else 1


def quintile_bias(out: np.ndarray, clean: np.ndarray, data_range: float) -> list[float]:
    """mean(out − clean) / ``data_range`` over the voxels of each fifth of the clean
    intensities (darkest first): the conditional bias of a shrinking estimator."""
    edges = np.quantile(clean, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    which = np.clip(np.searchsorted(edges, clean, side="right") - 1, 0, 4)
    diff = out.astype(np.float64) - clean
    return [float(diff[which == k].mean()) / data_range for k in range(5)]


def report(result: dict) -> str:
    lines = [
        "# Intensity bias: one shared range against separate ranges, every sampler",
        "",
        f"The demo's denoiser (DEMO_SETTINGS, dose {result['noise']['dose']:g}), "
        f"{result['steps']} training steps through `trainer.train` on "
        f"{'×'.join(map(str, result['train_shape']))} voxels (clean mean "
        f"{result['train_clean_mean']:.3f}); held-out {'×'.join(map(str, result['held_out']['shape']))} "
        f"(clean mean {result['held_out']['clean_mean']:.3f}), raw "
        "scale, whole-slice tiles. bias = mean(enhanced − clean) / clean range (acceptance: "
        f"|bias| ≤ {100 * result['accept_abs_bias']:g} %). Noisy input "
        f"{result['noisy_psnr']:.2f} dB.",
        "",
        "| model | clean target in model space | " + " | ".join(
            r["setting"] for r in result["models"][0]["rows"]) + " |",
        "|---|---|" + "---|" * len(result["models"][0]["rows"]),
    ]  # fmt: skip
    for m in result["models"]:
        lo, hi = m["clean_in_model_space"]
        cells = [f"{100 * r['bias']:+.1f} % / {r['psnr']:.1f} dB" for r in m["rows"]]
        lines.append(f"| {m['model']} | [{lo:+.2f}, {hi:+.2f}] | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: bias / PSNR. `sr3-union` is the model every run made before the split (one "
        "range from noisy ∪ clean); `sr3` and `residual` use separate ranges.",
        "",
        "Posterior mean (1 evaluation): bias by quintile of the clean intensity on the "
        "held-out volume (darkest → brightest), and on four more held-out regions (8×256²; "
        "clean mean in brackets):",
        "",
        "| model | by clean quintile | other regions |",
        "|---|---|---|",
        *(
            f"| {m['model']} | "
            + " / ".join(f"{100 * b:+.1f} %" for b in m["mean_bias_by_clean_quintile"])
            + " | "
            + ", ".join(
                f"{100 * r['bias']:+.1f} % ({r['clean_mean']:.3f})" for r in m["mean_bias_regions"]
            )
            + " |"
            for m in result["models"]
        ),
        "",
        "Passed (|bias| ≤ 1 % for every sampler): "
        + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in result["passed"].items()),
        "",
        f"Command: `{result['provenance']['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
