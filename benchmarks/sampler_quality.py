"""Sampler quality versus network evaluations (NFE) on a tiny denoising model.

Trains a tiny conditional UNet (emdiffuse-n, denoise) on a synthetic EM-like noisy/clean pair
through the shipping ``emdiffuse.training.trainer.train`` (settings: :data:`TRAINING`), then samples
held-out 64x64 tiles — from a different seed of the synthetic volume, far from the training
region, with their own noise — with every sampler at 1, 2, 4, 6, 8, 10, 16, 50 steps and the
reference's loop, all samplers from the same initial noise per tile, every random draw keyed on
the tile's global origin (as the pipeline does).

The baseline is the reference's true sampler: ancestral DDPM at the full length of the
inference schedule it samples on — by default the reference's ``beta_schedule.test`` (1000
steps, linear β 1e-4…0.09, alpha-bar 6.6e-21…0.9999; what imported reference weights store as
their inference schedule), where ``ddpm`` at 1000 steps walks exactly the reference's
``p_sample_loop``. Every sampler walks that same schedule as the Enhancer does for a model that
stores it: ``time`` spacing on the schedule itself, ``logsnr``/``karras`` spacings starting no
noisier than the training schedule's noisiest level (``noisiest``). ``--inference training``
samples on the training schedule instead (2000 steps; the baseline is then ddpm@1000 ``time``
spacing on it — what this benchmark measured before issue 15, not the reference's loop).

Two model kinds: the default is ours (:data:`TRAINING`: v-prediction, the reference's training
schedule); ``--reference-style`` trains the reference's way — ε-prediction on its 2000-step
linear training schedule (β 1e-6…1e-2) — and writes ``sampler_quality_reference_style.*``.
The tiny UNet, batch, learning rate and EMA weights are this benchmark's in both (the
reference samples with its non-EMA weights; a tiny run's raw weights are too noisy to compare).

Both quality axes of DESIGN.md, per tile: fidelity (PSNR, SSIM against the clean ground truth)
and texture (radial power-spectrum error over the upper half of frequencies, lower is better;
Fourier-ring-correlation 1/7 resolution, cycles/pixel, higher is better). Differences against
the reference are paired per tile and reported with their standard error.

Pass criterion (the goal of issue 3), for a sampler at <= 10 NFE, against ddpm@1000:

* PSNR: the 90 % confidence interval of the paired per-tile difference lies inside
  [-0.3, +0.3] dB (|mean| + 1.645 s.e. <= 0.3, an equivalence test). Being *above* by more
  than 0.3 dB is NOT a pass: few deterministic steps land near the posterior mean, which
  scores higher PSNR with a smoother, less true texture; the goal is the many-step result.
* texture: mean spectrum error <= 1.10 x the reference's AND mean FRC resolution >= the
  reference's - 0.01 cycles/pixel (both measure distance to the ground truth, so being
  better than the reference is fine).

The training run is cached in ``~/.cache/emdiffuse/bench/sampler_quality/<key>/`` (or
``$EMDIFFUSE_BENCH_CACHE``), keyed on every training setting but the step count; a longer run
resumes the cached one (``train(..., resume=True)``: exactly as if trained in one go), a shorter
one reads the EMA weights of its step's checkpoint, and a fresh machine trains from scratch.

    python benchmarks/sampler_quality.py                # our default kind
    python benchmarks/sampler_quality.py --reference-style   # trained the reference's way
    python benchmarks/sampler_quality.py --prediction x0 --train-steps 800 --tiles 16 \\
        --steps 1 8 50 250 --out /tmp/pilot_x0          # a quick pilot

Writes ``<name>.{json,md,png}`` to ``--out`` (default ``benchmarks/results``; ``--name``
default ``sampler_quality``, ``sampler_quality_reference_style`` with ``--reference-style``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdiffuse import metrics
from emdiffuse.models import diffusion, samplers
from emdiffuse.models.normalization import normalize
from emdiffuse.models.sampler_names import network_evaluations, resolve_spacing
from emdiffuse.models.unet import UNet
from emdiffuse.models.variants import REFERENCE_TEST_SCHEDULE, ModelConfig
from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise
from emdiffuse.training.degrade import add_poisson_gaussian_noise
from emdiffuse.training.state import checkpoint_path, latest_checkpoint, load_state
from emdiffuse.training.synthetic import synthetic_block
from emdiffuse.training.trainer import train

RESULTS = Path(__file__).parent / "results"
STEPS = (1, 2, 4, 6, 8, 10, 16, 50, 1000)
LONG_FROM = 100  # step counts >= this run only for the samplers named in --long
REFERENCE = "ddpm"  # the baseline: REFERENCE at the inference schedule's full length
# label -> (sampler, eta, spacing); every sampler of emdiffuse.models.samplers on its default
# spacing, ancestral DDPM on log-SNR spacing (the reference's sampler with a few-step schedule),
# and the DPM-Solver++ samplers on Karras et al.'s spacing (denser at low noise)
CONFIGS: dict[str, tuple[str, float, str | None]] = {
    "ddpm": ("ddpm", 0.0, "time"),
    "ddpm_logsnr": ("ddpm", 0.0, "logsnr"),
    "ddim": ("ddim", 0.0, None),
    "dpmpp_2m": ("dpmpp_2m", 0.0, None),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", 1.0, None),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", 1.0, None),
    "dpmpp_2m_karras": ("dpmpp_2m", 0.0, "karras"),
    "dpmpp_2m_sde_karras": ("dpmpp_2m_sde", 1.0, "karras"),
    "dpmpp_3m_sde_karras": ("dpmpp_3m_sde", 1.0, "karras"),
}
PSNR_TOL_DB = 0.3
Z90 = 1.645  # one-sided 95 % = two one-sided tests at 5 %: the 90 % interval
SPECTRUM_TOL = 1.10  # x the reference's spectrum error
FRC_TOL = 0.01  # cycles/pixel below the reference's FRC resolution
MAX_NFE = 10


# --------------------------------------------------------------------------------------
# training (through the shipping trainer)
# --------------------------------------------------------------------------------------
SCHEDULE = diffusion.Schedule("linear", 2000, 1e-6, 1e-2)  # the reference's training schedule
# the reference's inference schedule (its beta_schedule.test): what its test phase samples on
TEST_SCHEDULE = diffusion.Schedule.from_dict(REFERENCE_TEST_SCHEDULE)
INFERENCE = {"test": TEST_SCHEDULE, "training": SCHEDULE}  # --inference
# [0, 1] intensities -> model space [-1, 1] (clipped), fixed: training and evaluation alike
NORMALIZATION = {"low": 0.0, "high": 1.0}
# what train() is given (TrainSettings fields); the command line replaces a few of them
TRAINING: dict[str, Any] = {
    "size": "tiny",
    "unet": {"channel_mults": [1, 2, 4], "base_channels": 16, "num_res_blocks": 1},
    "schedule": SCHEDULE.to_dict(),
    "prediction": "v",
    "steps": 3000,
    "batch_size": 16,
    "patch": 64,
    "lr": 1e-3,
    "warmup": 200,
    "ema_decay": 0.999,
    "val_fraction": 0.0,  # no validation during training: the benchmark is the evaluation
    "ckpt_every": 500,
    "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Data:
    """The synthetic training pair: a clean region at the origin and its noisy version."""

    dose: float = 8.0
    read_noise: float = 1.0
    volume_seed: int = 0
    pool: tuple[int, int, int] = (64, 512, 512)  # clean training region at the origin

    def pair(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        clean = synthetic_block((0, 0, 0), self.pool, seed=self.volume_seed)
        noisy = add_poisson_gaussian_noise(clean, dose=self.dose, read_noise=self.read_noise,
                                           seed=1_000_003 * (seed + 1))  # fmt: skip
        return np.asarray(noisy, np.float32), np.asarray(clean, np.float32)


VERSION = 3  # bump when the training changes (3: trained through trainer.train)


def to_model(a: np.ndarray) -> np.ndarray:
    """[0, 1] intensities -> model space, as the trainer's loader maps them."""
    return normalize(a, NORMALIZATION)


def cache_key(training: dict[str, Any], data: Data) -> str:
    spec = {"training": {k: v for k, v in training.items() if k != "steps"},
            "data": dataclasses.asdict(data), "version": VERSION}  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("EMDIFFUSE_BENCH_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "emdiffuse" / "bench"
    return base / "sampler_quality"


def _step_of(path: Path | None) -> int:
    return 0 if path is None else int(path.stem.split("_")[1])


def train_model(training: dict[str, Any], data: Data, *, progress: bool = True
                ) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """The EMA network after ``training["steps"]`` steps of ``trainer.train``: read from the
    cached run, or trained (resuming the cached run when it is shorter)."""
    steps = int(training["steps"])
    folder = cache_root() / cache_key(training, data)
    latest = _step_of(latest_checkpoint(folder))
    if latest > steps and not checkpoint_path(folder, steps).exists():
        folder = folder.with_name(f"{folder.name}-{steps}")  # a shorter run of its own
        latest = _step_of(latest_checkpoint(folder))
    cpu_log = folder / "cpu_seconds.json"
    cpu = json.loads(cpu_log.read_text()) if cpu_log.exists() else {}
    if latest < steps:
        noisy, clean = data.pair(int(training["seed"]))
        c0 = time.process_time()
        train("denoise", [noisy, clean], folder, resume=latest > 0, device="cpu",
              progress=progress, normalization=NORMALIZATION, **training)  # fmt: skip
        cpu[str(steps)] = cpu.get(str(latest), 0.0 if latest == 0 else math.nan) + (
            time.process_time() - c0)  # fmt: skip
        cpu_log.write_text(json.dumps(cpu))
    state = load_state(checkpoint_path(folder, steps))
    config = ModelConfig.from_json(state["config"])
    net = UNet(config.unet)
    net.load_state_dict(state["ema"])
    losses = _losses(folder / "scalars.csv", steps)
    info = {"cache": str(folder), "resumed_from_step": min(latest, steps),
            "train_seconds": float(state["elapsed"]),
            "train_cpu_seconds": float(cpu.get(str(steps), math.nan)),
            "loss_first_100": float(np.mean([v for s, v in losses if s <= 100])),
            "loss_last_100": float(np.mean([v for s, v in losses if s > steps - 100])),
            "parameters": sum(p.numel() for p in net.parameters()),
            "unet": config.unet.to_dict()}  # fmt: skip
    return net.eval(), info


def _losses(path: Path, steps: int) -> list[tuple[int, float]]:
    """(step, mean loss of the 10 steps before) from the run's scalars.csv, up to ``steps``."""
    with path.open() as fh:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh) if r["loss"]]
    return [(s, v) for s, v in rows if s <= steps]


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalSet:
    cond: torch.Tensor  # (N, 1, t, t) model space
    clean: np.ndarray  # (N, t, t) in [0, 1]
    origins: list[tuple[int, int, int]]  # global zyx origin of each tile
    seed: int

    def x_T(self) -> torch.Tensor:
        t = self.clean.shape[-1]
        return torch.from_numpy(np.stack([tile_noise(self.seed, 0, o, INITIAL_STEP, (1, t, t))
                                          for o in self.origins]))  # fmt: skip

    def step_noise(self, i: int) -> torch.Tensor:
        t = self.clean.shape[-1]
        return torch.from_numpy(np.stack([tile_noise(self.seed, 0, o, i, (1, t, t))
                                          for o in self.origins]))  # fmt: skip


def held_out(n_tiles: int, *, tile: int, dose: float, read_noise: float, volume_seed: int,
             seed: int) -> EvalSet:  # fmt: skip
    """``n_tiles`` tiles from another seed of the synthetic volume, far from the training
    region: slices 16 voxels apart, a 4 x 4 grid of tiles on each, noise of its own."""
    origin = (2000, 4000, 4000)
    per_slice = 16
    n_slices = math.ceil(n_tiles / per_slice)
    cond, clean, origins = [], [], []
    for k in range(n_slices):
        z = origin[0] + 16 * k
        block_origin = (z, origin[1], origin[2])
        c = synthetic_block(block_origin, (1, 4 * tile, 4 * tile), seed=volume_seed)
        noisy = add_poisson_gaussian_noise(c, dose=dose, read_noise=read_noise,
                                           seed=volume_seed + 77, origin=block_origin)  # fmt: skip
        for j in range(4):
            for i in range(4):
                sl = (0, slice(j * tile, (j + 1) * tile), slice(i * tile, (i + 1) * tile))
                cond.append(to_model(noisy[sl])[None])
                clean.append(c[sl])
                origins.append((z, origin[1] + j * tile, origin[2] + i * tile))
    cond, clean, origins = cond[:n_tiles], clean[:n_tiles], origins[:n_tiles]
    return EvalSet(torch.from_numpy(np.stack(cond)), np.stack(clean), origins, seed)


def per_tile(out: np.ndarray, clean: np.ndarray) -> dict[str, np.ndarray]:
    """Per-tile PSNR, SSIM, spectrum error and FRC resolution of model-space ``out``."""
    o = np.clip((out.reshape(clean.shape) + 1) / 2, 0, 1)
    pairs = list(zip(o, clean, strict=True))
    return {
        "psnr": np.array([metrics.psnr(a, b, data_range=1.0) for a, b in pairs]),
        "ssim": np.array([metrics.ssim(a, b, data_range=1.0) for a, b in pairs]),
        "spectrum_error": np.array([metrics.spectrum_error(a, b) for a, b in pairs]),
        "frc_resolution": np.array([metrics.frc_resolution(a, b) for a, b in pairs]),
    }


def summarise(row: dict, tiles: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None) -> dict:
    """Means, and paired differences against the reference with standard errors."""
    n = len(tiles["psnr"])
    for k, v in tiles.items():
        row[k] = float(np.mean(v))
        if ref is not None:
            d = v - ref[k]
            row[f"d_{k}"] = float(np.mean(d))
            row[f"se_{k}"] = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return row


def judge(row: dict, ref: dict) -> dict[str, bool]:
    """The pass criterion (module docstring) for one row against the reference row."""
    psnr_ok = abs(row["d_psnr"]) + Z90 * row["se_psnr"] <= PSNR_TOL_DB
    spec_ok = row["spectrum_error"] <= SPECTRUM_TOL * ref["spectrum_error"]
    frc_ok = row["frc_resolution"] >= ref["frc_resolution"] - FRC_TOL
    return {"psnr_ok": bool(psnr_ok), "texture_ok": bool(spec_ok and frc_ok),
            "pass": bool(0 < row["nfe"] <= MAX_NFE and psnr_ok and spec_ok and frc_ok)}  # fmt: skip


def denoise_error_curve(net, ev: EvalSet, prediction: str) -> list[dict]:
    """x0-space RMSE of one network call on the held-out tiles at a few noise levels."""
    x0 = torch.from_numpy(to_model(ev.clean))[:, None]
    eps = ev.x_T()
    den = diffusion.make_denoiser(net, ev.cond, SCHEDULE, prediction)
    out = []
    for logsnr in (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0):
        a = 1.0 / (1.0 + math.exp(-logsnr))
        x_t = diffusion.q_sample(x0, a, eps)
        rmse = float((den(x_t, a) - x0).pow(2).mean().sqrt()) / 2  # on the [0, 1] scale
        out.append({"logsnr": logsnr, "rmse": rmse})
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}  # fmt: skip


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def fmt_d(row: dict, key: str, digits: int) -> str:
    if f"d_{key}" not in row:
        return "—"
    return f"{row[f'd_{key}']:+.{digits}f} ± {row[f'se_{key}']:.{digits}f}"


def baseline_sentence(result: dict) -> str:
    """What the baseline and the samplers walked, in words."""
    sch = result.get("inference_schedule", SCHEDULE.to_dict())
    kind = ("trained the reference's way (ε-prediction, its 2000-step linear training schedule "
            "β 1e-6…1e-2)" if result.get("reference_style") else
            f"our default kind ({result['training']['prediction']}-prediction, the reference's "
            "2000-step linear training schedule β 1e-6…1e-2)")  # fmt: skip
    where = (f"**Baseline: the reference's loop** — ancestral `ddpm` at the full length of the "
             f"reference's inference schedule (`beta_schedule.test`: {sch['steps']} steps, "
             f"linear β {sch['beta_start']:g}…{sch['beta_end']:g}), step for step its "
             "`p_sample_loop`. Every sampler walks that schedule (`time` spacing: its own "
             "points; `logsnr`/`karras`: starting no noisier than the training schedule's "
             f"noisiest alpha-bar {result.get('noisiest') or 0:.3g}, as the Enhancer does)."
             if result.get("inference", "training") == "test" else
             "**Baseline: ddpm@1000 on the TRAINING schedule** (2000 steps, `time` spacing) — "
             "NOT the reference's loop, which samples on its 1000-step test schedule.")  # fmt: skip
    return f"{where} Model: {kind}."


def markdown(result: dict) -> str:
    rows, ref = result["rows"], result["reference_row"]
    s, m = result["training"], result["machine"]
    md = [
        "# Sampler quality versus network evaluations",
        "",
        baseline_sentence(result),
        "",
        f"Tiny emdiffuse-n denoiser ({s['parameters']:,} parameters, {s['prediction']} "
        f"prediction, {s['steps']} steps of batch {s['batch_size']} at {s['patch']}², EMA "
        f"{s['ema_decay']}, trained by trainer.train) on synthetic EM at dose {s['dose']} e⁻/voxel; {result['tiles']} held-out "
        f"{result['tile']}² tiles (another seed of the volume, another region, own noise). "
        'Δ: paired per-tile difference against the baseline ("reference") ± its standard error. '
        "Spectrum err: mean |log10 power ratio| over the upper half of frequencies (↓); "
        "FRC: 1/7-threshold resolution in cycles/pixel (↑).",
        "",
        "| sampler | steps | NFE | PSNR dB | ΔPSNR dB | SSIM | spectrum err | Δspectrum | "
        "FRC res | s | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = ("**pass**" if r.get("pass") else "fail") if 0 < r["nfe"] <= MAX_NFE else ""
        if r is ref or (r["sampler"] == ref["sampler"] and r["steps"] == ref["steps"]):
            goal = "reference"
        md.append(
            f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['psnr']:.2f} | "
            f"{fmt_d(r, 'psnr', 2)} | {r['ssim']:.3f} | {r['spectrum_error']:.3f} | "
            f"{fmt_d(r, 'spectrum_error', 3)} | {r['frc_resolution']:.3f} | "
            f"{r['seconds']:.1f} | {goal} |"
        )
    v = result["verdict"]
    md += [
        "",
        f"**Pass criterion** (≤ {MAX_NFE} NFE, against {v['reference']}): the 90 % interval of "
        f"ΔPSNR inside ±{PSNR_TOL_DB} dB (|Δ| + {Z90}·s.e. ≤ {PSNR_TOL_DB}; being *above* the "
        f"reference by more than {PSNR_TOL_DB} dB does not pass — that is the smooth "
        f"posterior-mean side), AND spectrum error ≤ {SPECTRUM_TOL:.2f}× the reference's "
        f"({SPECTRUM_TOL * ref['spectrum_error']:.3f}) AND FRC resolution ≥ the reference's − "
        f"{FRC_TOL} ({ref['frc_resolution'] - FRC_TOL:.3f}).",
        "",
        f"**Goal {'met' if v['goal_met'] else 'not met'}**: "
        + (
            f"passing: {', '.join(v['passing'])}; fewest NFE: {v['fewest_nfe']}."
            if v["goal_met"]
            else f"closest in PSNR at ≤ {MAX_NFE} NFE: {v['closest']}."
        )
        + f" Reference {v['reference']}: {ref['psnr']:.2f} dB, SSIM {ref['ssim']:.3f}, "
        f"spectrum error {ref['spectrum_error']:.3f}, FRC {ref['frc_resolution']:.3f}.",
        "",
        "One-call x0 error of the network on the held-out tiles (RMSE on the [0, 1] scale) by "
        "log-SNR: "
        + ", ".join(f"{c['logsnr']:+.0f}: {c['rmse']:.4f}" for c in result["denoise_error_curve"])
        + ".",
        "",
        f"Training: {s['train_seconds']:.0f} s wall, {s['train_cpu_seconds']:.0f} s CPU "
        f"({result['train_source']}), loss "
        f"{s['loss_first_100']:.4f} → {s['loss_last_100']:.4f} (first/last 100 steps). "
        f"Evaluation: {result['eval_seconds']:.0f} s. Machine: {m['cpu']}, {m['cores']} cores "
        f"(shared; load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'] or [])}), "
        f"torch {m['torch']}, {m['threads']} threads.",
        "",
        f"Command: `{result['command']}`",
    ]
    for note in result.get("notes", []):
        md += ["", note]
    return "\n".join(md) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ref = result["rows"], result["reference_row"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    keys = (("psnr", "PSNR (dB) ↑, error bars: s.e. of the paired Δ"),
            ("spectrum_error", "power-spectrum error, upper half ↓"),
            ("frc_resolution", "FRC 1/7 resolution (cycles/px) ↑"))  # fmt: skip
    names = list(dict.fromkeys(r["sampler"] for r in rows if r["nfe"] > 0))
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name in names:
            pts = [r for r in rows if r["sampler"] == name]
            err = [r.get(f"se_{key}", 0.0) for r in pts] if key == "psnr" else None
            ax.errorbar([r["nfe"] for r in pts], [r[key] for r in pts], yerr=err, marker="o",
                        ms=3.5, capsize=2, label=name,
                        ls="--" if name.endswith("_karras") else "-")  # fmt: skip
        ax.axhline(rows[0][key], color="gray", ls=":", label="noisy input")
        ax.axhline(ref[key], color="k", ls="--", lw=0.8, label=f"{result['verdict']['reference']}")
        if key == "psnr":
            ax.axhspan(ref[key] - PSNR_TOL_DB, ref[key] + PSNR_TOL_DB, color="k", alpha=0.1,
                       label=f"±{PSNR_TOL_DB} dB")  # fmt: skip
            ax.set_ylim(min(r["psnr"] for r in rows[1:]) - 0.5, max(r["psnr"] for r in rows) + 0.5)
        elif key == "spectrum_error":
            ax.axhspan(0, SPECTRUM_TOL * ref[key], color="k", alpha=0.06, label="pass region")
            ax.set_ylim(0, min(1.2, max(r[key] for r in rows[1:]) * 1.1))
        else:
            ax.axhspan(ref[key] - FRC_TOL, 0.5, color="k", alpha=0.06, label="pass region")
        ax.axvspan(0.8, MAX_NFE + 0.4, color="tab:green", alpha=0.05)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("sampler quality vs NFE (green: ≤ 10 NFE, the goal's budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    unet, data = TRAINING["unet"], Data()
    p.add_argument("--reference-style", action="store_true",
                   help="train the reference's way: eps-prediction (its training schedule is "
                   "the default already); default --name sampler_quality_reference_style")  # fmt: skip
    p.add_argument("--prediction", default=None, choices=diffusion.PREDICTIONS,
                   help=f"default {TRAINING['prediction']} (eps with --reference-style)")  # fmt: skip
    p.add_argument("--inference", default="test", choices=list(INFERENCE),
                   help="the schedule every sampler walks, the baseline being ddpm at its full "
                   "length: test = the reference's beta_schedule.test (1000 steps, linear beta "
                   "1e-4..0.09; ddpm@1000 is its p_sample_loop), training = the 2000-step "
                   "training schedule (baseline ddpm@1000 on it, time spacing: the pre-issue-15 "
                   "measurement)")  # fmt: skip
    p.add_argument("--train-steps", type=int, default=TRAINING["steps"])
    p.add_argument("--batch", type=int, default=TRAINING["batch_size"])
    p.add_argument("--base-channels", type=int, default=unet["base_channels"])
    p.add_argument("--num-res-blocks", type=int, default=unet["num_res_blocks"])
    p.add_argument("--dose", type=float, default=data.dose, help="electrons per voxel")
    p.add_argument("--tiles", type=int, default=48, help="held-out 64x64 tiles")
    p.add_argument("--seed", type=int, default=0, help="training seed (part of the cache key)")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="seed of the sampling noise (default: --seed + 12345); another value "
                   "repeats the evaluation with fresh noise on the same model")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared CPU more threads spin-wait (measured: 2 "
                   "threads 6x slower than 1 at load 12 on 2 cores)")  # fmt: skip
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--samplers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--long", nargs="+", default=[REFERENCE], choices=list(CONFIGS),
                   help=f"samplers also run at step counts >= {LONG_FROM}")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None,
                   help="stem of the files written (default sampler_quality, "
                   "sampler_quality_reference_style with --reference-style)")  # fmt: skip
    return p


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], Data]:
    """The trainer's settings and the training data of this invocation."""
    unet = {**TRAINING["unet"], "base_channels": args.base_channels,
            "num_res_blocks": args.num_res_blocks}  # fmt: skip
    prediction = args.prediction or ("eps" if args.reference_style else TRAINING["prediction"])
    training = {**TRAINING, "unet": unet, "prediction": prediction,
                "steps": args.train_steps, "batch_size": args.batch, "seed": args.seed}  # fmt: skip
    return training, dataclasses.replace(Data(), dose=args.dose)


def baseline_steps(schedule: diffusion.Schedule, inference: str) -> int:
    """Steps of the baseline ddpm: the inference schedule's full length (the reference's loop);
    on the training schedule 1000 (``time`` spacing; the pre-issue-15 baseline)."""
    return schedule.steps if inference == "test" else 1000


def _evaluate(net, ev: EvalSet, prediction: str, args, schedule: diffusion.Schedule,
              noisiest: float | None) -> tuple[list, list, float]:  # fmt: skip
    """Every sampler at every step count on the held-out tiles, walking ``schedule`` (few-step
    spacings start no noisier than ``noisiest``): (runs, error curve, seconds)."""
    x_T = ev.x_T()
    denoise = diffusion.make_denoiser(net, ev.cond, schedule, prediction)
    ref_steps = baseline_steps(schedule, args.inference)
    t_eval = time.perf_counter()
    with torch.inference_mode():
        curve = denoise_error_curve(net, ev, prediction)
        runs: list[tuple[dict, dict[str, np.ndarray]]] = []
        runs.append(({"sampler": "input (noisy)", "steps": 0, "nfe": 0, "seconds": 0.0},
                     per_tile(ev.cond.numpy(), ev.clean)))  # fmt: skip
        order = [REFERENCE] + [n for n in args.samplers if n != REFERENCE]
        for name in order:
            sampler, eta, spacing = CONFIGS[name]
            steps_of = set(args.steps) | ({ref_steps} if name == REFERENCE else set())
            for steps in sorted(steps_of):
                if steps >= LONG_FROM and name not in args.long and not (
                        name == REFERENCE and steps == ref_steps):  # fmt: skip
                    continue
                t = time.perf_counter()
                out = samplers.sample(denoise, x_T, schedule, sampler=sampler, steps=steps,
                                      step_noise=ev.step_noise, eta=eta, spacing=spacing,
                                      noisiest=noisiest)  # fmt: skip
                row = {"sampler": name, "steps": steps,
                       "nfe": network_evaluations(sampler, steps),
                       "seconds": time.perf_counter() - t}  # fmt: skip
                runs.append((row, per_tile(out.numpy(), ev.clean)))
                tl = runs[-1][1]
                print(f"{name:>13} {steps:5d} steps  PSNR {tl['psnr'].mean():6.2f}  "
                      f"SSIM {tl['ssim'].mean():.3f}  spec {tl['spectrum_error'].mean():.3f}  "
                      f"FRC {tl['frc_resolution'].mean():.3f}  {row['seconds']:.1f} s", flush=True)  # fmt: skip
    return runs, curve, time.perf_counter() - t_eval


def _verdict(runs: list, ref_steps: int) -> tuple[list[dict], dict, dict]:
    """Rows summarised against the baseline ``REFERENCE@ref_steps``, judged: (rows, baseline
    row, verdict)."""
    ref_tiles = next(tl for r, tl in runs if r["sampler"] == REFERENCE and r["steps"] == ref_steps)
    rows = [summarise(r, tl, ref_tiles) for r, tl in runs]
    ref_row = next(r for r in rows if r["sampler"] == REFERENCE and r["steps"] == ref_steps)
    for r in rows:
        if r["nfe"] > 0 and r is not ref_row:
            r.update(judge(r, ref_row))
    fast = [r for r in rows if 0 < r["nfe"] <= MAX_NFE]
    passing = [r for r in fast if r.get("pass")]  # the reference itself is not judged
    closest = min(fast, key=lambda r: abs(r["d_psnr"]))
    verdict = {
        "reference": f"{REFERENCE}@{ref_steps}",
        "goal_met": bool(passing),
        "passing": [f"{r['sampler']}@{r['steps']}" for r in passing],
        "fewest_nfe": (f"{min(passing, key=lambda r: r['nfe'])['sampler']}@"
                       f"{min(passing, key=lambda r: r['nfe'])['steps']}" if passing else None),
        "closest": (f"{closest['sampler']}@{closest['steps']} (ΔPSNR {closest['d_psnr']:+.2f} ± "
                    f"{closest['se_psnr']:.2f} dB, spectrum {closest['spectrum_error']:.3f})"),
        "criterion": {"psnr_tol_db": PSNR_TOL_DB, "z": Z90, "two_sided": True,
                      "spectrum_tol_ratio": SPECTRUM_TOL, "frc_tol": FRC_TOL, "max_nfe": MAX_NFE},
    }  # fmt: skip
    return rows, ref_row, verdict


def main() -> int:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals in a tiny trained net slow CPU inference 2x
    command = "python benchmarks/sampler_quality.py " + " ".join(
        f"--{k.replace('_', '-')}"
        + ("" if isinstance(v, bool) else f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
        for k, v in vars(args).items()
        if v is not None and v is not False
    )
    mach = machine()
    # imported here: the tests load this module by path, without benchmarks/ on sys.path
    from provenance import provenance

    record = provenance()
    training, data = _settings(args)
    t0 = time.perf_counter()
    net, info = train_model(training, data)
    unet = info.pop("unet")
    start = info["resumed_from_step"]
    source = ("trained now" if start == 0 else
              f"cached: trained earlier, resumed at step {start}"
              if start < training["steps"] else "cached weights, trained earlier")  # fmt: skip
    print(f"model: {source}; {time.perf_counter() - t0:.0f} s here")

    tile = 64
    ev = held_out(args.tiles, tile=tile, dose=data.dose, read_noise=data.read_noise,
                  volume_seed=data.volume_seed + 1,
                  seed=args.seed + 12345 if args.noise_seed is None else args.noise_seed)  # fmt: skip
    schedule = INFERENCE[args.inference]
    # as the Enhancer: on a stored inference schedule, few-step spacings start no noisier
    # than the training schedule's noisiest level
    noisiest = float(SCHEDULE.alpha_bars[-1]) if args.inference == "test" else None
    runs, curve, eval_s = _evaluate(net, ev, training["prediction"], args, schedule, noisiest)
    rows, ref_row, verdict = _verdict(runs, baseline_steps(schedule, args.inference))
    result = {
        "command": command, "machine": mach, "provenance": record,
        "training": training | dataclasses.asdict(data) | {"version": VERSION} | info,
        "train_source": source, "schedule": SCHEDULE.to_dict(), "unet": unet,
        "inference": args.inference, "inference_schedule": schedule.to_dict(),
        "noisiest": noisiest, "reference_style": bool(args.reference_style),
        "tile": tile, "tiles": args.tiles, "eval_seconds": eval_s,
        "samplers": {k: {"sampler": v[0], "eta": v[1], "spacing": resolve_spacing(v[0], v[2])}
                     for k, v in CONFIGS.items() if k in args.samplers},
        "denoise_error_curve": curve, "rows": rows, "reference_row": ref_row,
        "verdict": verdict,
        "per_tile_psnr": {f"{r['sampler']}@{r['steps']}": tl["psnr"].round(3).tolist()
                          for r, tl in runs},
    }  # fmt: skip
    name = args.name or ("sampler_quality_reference_style" if args.reference_style
                         else "sampler_quality")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / f"{name}.md").write_text(md)
    plot(result, args.out / f"{name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
