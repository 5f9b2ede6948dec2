"""Sampler quality versus network evaluations (NFE) on a tiny denoising model.

Trains a tiny conditional UNet (emdiffuse-n, denoise) on synthetic EM-like data for a few CPU
minutes, then samples held-out 64x64 tiles with every sampler at 1, 2, 4, 8, 16, 50 (and 1000
for ancestral DDPM and DDIM) steps, all from the same initial noise. Reports fidelity (PSNR,
SSIM against the clean ground truth) and texture (radial power-spectrum error over the upper
half of frequencies, lower is better; FRC 1/7 resolution in cycles/pixel, higher is better).

    python benchmarks/sampler_quality.py [--train-seconds 200] [--prediction v]

Writes benchmarks/results/sampler_quality.{json,md,png}. The model's state_dict goes to a
temporary directory, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emdiffuse.models import diffusion, samplers
from emdiffuse.models.unet import UNet, UNetConfig
from emdiffuse.pipeline import metrics
from emdiffuse.pipeline.degrade import add_poisson_gaussian_noise
from emdiffuse.pipeline.synthetic import synthetic_block

RESULTS = Path(__file__).parent / "results"
STEPS = (1, 2, 4, 8, 16, 50, 1000)
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
LONG = {"ddpm", "ddim"}  # only these run 1000 steps


def make_pairs(origin, n_slices, side, dose, seed):
    """(cond, target) float32 (n, 1, side, side) in model space [-1, 1] (clean is [0, 1])."""
    clean = synthetic_block(origin, (n_slices, side, side), seed=seed)
    noisy = add_poisson_gaussian_noise(clean, dose=dose, read_noise=1.0, seed=seed + 1,
                                       origin=origin)  # fmt: skip
    to_model = lambda a: np.clip(2 * a - 1, -1.5, 1.5).astype(np.float32)  # noqa: E731
    return to_model(noisy)[:, None], to_model(clean)[:, None]


def tiles(cond, target, tile, count, rng):
    n, _, h, w = target.shape
    idx = rng.integers(0, n, count)
    ys = rng.integers(0, h - tile + 1, count)
    xs = rng.integers(0, w - tile + 1, count)
    c = np.stack(
        [cond[i, :, y : y + tile, x : x + tile] for i, y, x in zip(idx, ys, xs, strict=True)]
    )
    t = np.stack(
        [target[i, :, y : y + tile, x : x + tile] for i, y, x in zip(idx, ys, xs, strict=True)]
    )
    return torch.from_numpy(c), torch.from_numpy(t)


def train(net, cond, target, schedule, prediction, seconds, batch, tile, seed):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    ema = diffusion.EMA(net, decay=0.995)
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds:
        c, t = tiles(cond, target, tile, batch, rng)
        k = int(rng.integers(4))  # 90-degree rotations and a flip
        c, t = torch.rot90(c, k, (2, 3)), torch.rot90(t, k, (2, 3))
        if rng.random() < 0.5:
            c, t = c.flip(3), t.flip(3)
        loss = diffusion.diffusion_loss(net, c, t, schedule, prediction, "mse", generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)
        losses.append(float(loss.detach()))
        step += 1
    return ema.averaged(net).eval(), step, losses


def scores(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    o, r = (out[:, 0] + 1) / 2, (ref[:, 0] + 1) / 2  # back to [0, 1]
    return {
        "psnr": metrics.psnr(np.clip(o, 0, 1), r, data_range=1.0),
        "ssim": metrics.ssim(np.clip(o, 0, 1), r, data_range=1.0),
        "spectrum_error": float(
            np.mean([metrics.spectrum_error(a, b) for a, b in zip(o, r, strict=True)])
        ),
        "frc_resolution": float(
            np.mean([metrics.frc_resolution(a, b) for a, b in zip(o, r, strict=True)])
        ),
    }


def judge(rows: list[dict], reference: str, ref_row: dict) -> dict:
    """Both quality axes: PSNR within ±0.3 dB of the reference AND a texture (spectrum) error
    no worse than the reference's by more than 10 %, at ≤ 10 network evaluations."""
    fast = [r for r in rows if 0 < r["nfe"] <= 10]
    best = min(fast, key=lambda r: abs(r["psnr"] - ref_row["psnr"]))
    within = [
        f"{r['sampler']}@{r['steps']}"
        for r in fast
        if abs(r["psnr"] - ref_row["psnr"]) <= 0.3
        and r["spectrum_error"] <= 1.1 * ref_row["spectrum_error"]
    ]
    return {
        "reference": reference,
        "reference_psnr": ref_row["psnr"],
        "reference_spectrum_error": ref_row["spectrum_error"],
        "closest_psnr_at_most_10_nfe": f"{best['sampler']}@{best['steps']}",
        "closest_psnr_minus_reference_db": best["psnr"] - ref_row["psnr"],
        "within_0.3_db_and_texture_at_most_10_nfe": within,
        "goal_met": bool(within),
    }


def verdict_line(verdict: dict) -> str:
    """One markdown line stating the goal check on both axes."""
    passing = verdict["within_0.3_db_and_texture_at_most_10_nfe"]
    return (
        f"Reference {verdict['reference']}: {verdict['reference_psnr']:.2f} dB, spectrum error "
        f"{verdict['reference_spectrum_error']:.3f}. Goal (≤ 10 NFE, PSNR within ±0.3 dB AND "
        f"spectrum error ≤ 1.1× the reference's): {', '.join(passing) or 'not met'}."
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-seconds", type=float, default=200.0)
    p.add_argument("--prediction", default="v", choices=diffusion.PREDICTIONS)
    p.add_argument("--dose", type=float, default=8.0, help="electrons per voxel (noise level)")
    p.add_argument("--tiles", type=int, default=8, help="held-out 64x64 tiles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--long", nargs="+", default=sorted(LONG), help="samplers run at 1000 steps")
    p.add_argument("--load", default=None, help="state_dict of an already trained model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals in a tiny trained net slow CPU inference 2x
    torch.manual_seed(args.seed)

    schedule = diffusion.Schedule("linear", 2000, 1e-6, 1e-2)  # the reference's training schedule
    cond_tr, tgt_tr = make_pairs((0, 0, 0), 16, 256, args.dose, args.seed)
    cond_te, tgt_te = make_pairs((500, 1000, 1000), 4, 128, args.dose, args.seed)
    config = UNetConfig(in_channels=2, out_channels=1, base_channels=16, channel_mults=(1, 2, 4),
                        num_res_blocks=1, attention_resolutions=(), dropout=0.0)  # fmt: skip
    net = UNet(config)
    t0 = time.perf_counter()
    if args.load:
        net.load_state_dict(torch.load(args.load, weights_only=True))
        ema_net, n_steps, losses, ckpt = net.eval(), 0, [math.nan], args.load
    else:
        ema_net, n_steps, losses = train(net, cond_tr, tgt_tr, schedule, args.prediction,
                                         args.train_seconds, 8, 64, args.seed)  # fmt: skip
        ckpt = Path(tempfile.mkdtemp(prefix="emdiffuse_bench_")) / "sampler_quality_tiny.pt"
        torch.save(ema_net.state_dict(), ckpt)
    train_s = time.perf_counter() - t0
    print(f"trained {n_steps} steps in {train_s:.0f} s; loss {np.mean(losses[:20]):.4f} -> "
          f"{np.mean(losses[-20:]):.4f}; state_dict at {ckpt}")  # fmt: skip

    c, ref = tiles(cond_te, tgt_te, 64, args.tiles, np.random.default_rng(args.seed + 99))
    x_T = torch.randn(ref.shape, generator=torch.Generator().manual_seed(args.seed + 7))

    def step_noise(i):
        return torch.randn(ref.shape, generator=torch.Generator().manual_seed(10_000 + i))

    denoise = diffusion.make_denoiser(ema_net, c, schedule, args.prediction)
    rows = [{"sampler": "input (noisy)", "steps": 0, "nfe": 0, "seconds": 0.0,
             **scores(c.numpy(), ref.numpy())}]  # fmt: skip
    with torch.inference_mode():
        for name in SAMPLERS:
            for steps in args.steps:
                if steps == 1000 and name not in args.long:
                    continue
                t = time.perf_counter()
                out = samplers.sample(denoise, x_T, schedule, sampler=name, steps=steps,
                                      step_noise=step_noise)  # fmt: skip
                row = {"sampler": name, "steps": steps,
                       "nfe": samplers.network_evaluations(name, steps),
                       "seconds": time.perf_counter() - t, **scores(out.numpy(), ref.numpy())}  # fmt: skip
                rows.append(row)
                print(f"{name:>13} {steps:5d} steps  PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}  "
                      f"spec {row['spectrum_error']:.3f}  FRC {row['frc_resolution']:.3f}  "
                      f"{row['seconds']:.1f} s", flush=True)  # fmt: skip

    longest = max(r["steps"] for r in rows if r["sampler"] == "ddpm")
    ref_row = next(r for r in rows if r["sampler"] == "ddpm" and r["steps"] == longest)
    verdict = judge(rows, f"ddpm@{longest}", ref_row)
    result = {"command": "python benchmarks/sampler_quality.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),  # fmt: skip
              "prediction": args.prediction, "dose": args.dose, "tile": 64, "tiles": args.tiles,
              "train_steps": n_steps, "train_seconds": train_s, "unet": config.to_dict(),
              "schedule": schedule.to_dict(), "spacing": {"ddpm": "time", "others": "logsnr"},
              "rows": rows, "verdict": verdict}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampler_quality.json").write_text(json.dumps(result, indent=1))
    md = ["| sampler | steps | NFE | PSNR dB | SSIM | spectrum err (upper half) | FRC res | s |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.3f} "
                  f"| {r['spectrum_error']:.3f} | {r['frc_resolution']:.3f} | {r['seconds']:.1f} |")  # fmt: skip
    md.append("")
    md.append(verdict_line(verdict))
    (RESULTS / "sampler_quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(rows, ref_row, RESULTS / "sampler_quality.png")
    return 0


def plot(rows, ref_row, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = (("psnr", "PSNR (dB) ↑"), ("spectrum_error", "power-spectrum error, upper half ↓"),
            ("frc_resolution", "FRC 1/7 resolution (cycles/px) ↑"))  # fmt: skip
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name in SAMPLERS:
            pts = [(r["nfe"], r[key]) for r in rows if r["sampler"] == name]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        inp = rows[0][key]
        ax.axhline(inp, color="gray", ls=":", label="noisy input")
        ax.axhline(ref_row[key], color="k", ls="--", lw=0.8, label="ddpm@1000")
        if key == "psnr":
            ax.axhspan(ref_row[key] - 0.3, ref_row[key] + 0.3, color="k", alpha=0.08)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
