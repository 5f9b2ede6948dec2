"""bf16 autocast on a CPU: training and sampling speed, and what it changes in the output.

``precision="auto"`` (training and enhancement) runs the network under bf16 autocast on a CPU
with Intel AMX or AVX512-BF16 (:func:`emdiffuse.models.device.autocast_dtype`). This benchmark measures, in
one run on the machine it runs on:

The data are the demo's (``training.demo_model.demo_pair``); the test tiles lie outside the
training region.

* training: ms per optimisation step of the residual-kind model with the demo's recipe
  (tiny preset, batch 8, 48² patches), fp32 against bf16, in alternating rounds of the same
  pre-drawn batches (so drift of the machine's load hits both alike);
* sampling: seconds per batch of 256² tiles at the default sampler (``dpmpp_2m``, 8 NFE) and in
  mean mode (1 NFE), fp32 against bf16, with a model trained for ``--train-steps`` in fp32;
* the output: PSNR of each precision's sample and mean against the truth, and of the bf16
  output against the fp32 output of the same model and noise (data range: the model's
  [-1, 1]).

    python benchmarks/cpu_bf16.py [--train-steps 300] [--rounds 3] [--steps-per-round 15]

Writes ``results/cpu_bf16.{json,md}`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import bf16_hardware_label, machine_info, publish, start_record
from train_step import demo_recipe, round_times

from emdiffuse import metrics
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.normalization import condition_from_model, from_model, normalize
from emdiffuse.training import build, trainer
from emdiffuse.training.demo_model import demo_pair
from emdiffuse.training.settings import DEMO_SETTINGS
from emdiffuse.training.step import train_step

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def step_times(rounds: int, per_round: int) -> dict[str, list[float]]:
    """ms per training step of each precision, one list entry per round."""
    s, config, schedule, batches = demo_recipe(per_round + 2)
    dev = torch.device("cpu")
    steps = {}
    for name, dtype in PRECISIONS.items():
        net = build.build_net(config, s.seed)
        optimizer = build.make_optimizer(net, s, dev)

        def step(batch, net=net, optimizer=optimizer, dtype=dtype) -> None:
            train_step(net, net, optimizer, batch, schedule, config, s, dev, dtype)

        steps[name] = step
    return round_times(steps, batches, rounds)


def sampling(model: Path, test: tuple[np.ndarray, np.ndarray], tiles: int) -> dict:
    """Seconds per batch and PSNRs of each precision's sample and mean (model space)."""
    noisy, clean = test
    enhancers = {name: Enhancer.load(model, precision=name) for name in PRECISIONS}
    cfg = enhancers["fp32"].config
    cond = normalize(noisy[:tiles, None], condition_from_model(cfg)).astype(np.float32)
    truth = normalize(clean[:tiles, None], from_model(cfg), clip=False).astype(np.float32)
    noise = np.random.default_rng(7).standard_normal(truth.shape).astype(np.float32)
    out: dict[str, dict] = {}
    results = {}
    for name, enhancer in enhancers.items():
        enhancer.enhance(cond[:1], noise[:1], steps=8)  # warm-up
        t0 = time.perf_counter()
        sample = enhancer.enhance(cond, noise, steps=8)
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        mean = np.clip(enhancer.posterior_mean(cond, noise), -1, 1)
        t_mean = time.perf_counter() - t0
        results[name] = (sample, mean)
        out[name] = {
            "sample_s": t_sample, "mean_s": t_mean,
            "sample_psnr": metrics.psnr(sample, truth, data_range=2.0),
            "mean_psnr": metrics.psnr(mean, truth, data_range=2.0),
        }  # fmt: skip
    out["bf16_vs_fp32"] = {
        "sample_psnr": metrics.psnr(results["bf16"][0], results["fp32"][0], data_range=2.0),
        "mean_psnr": metrics.psnr(results["bf16"][1], results["fp32"][1], data_range=2.0),
        "sample_max_abs": float(np.abs(results["bf16"][0] - results["fp32"][0]).max()),
    }
    out["input_psnr"] = metrics.psnr(np.clip(cond, -1, 1), truth, data_range=2.0)
    return out


def markdown(r: dict) -> str:
    t, s = r["train_ms"], r["sampling"]
    med = {k: statistics.median(v) for k, v in t.items()}
    d = s["bf16_vs_fp32"]
    lines = [
        "# bf16 autocast on a CPU: speed and output",
        "",
        f"`python benchmarks/cpu_bf16.py {' '.join(r['argv'])}`; {r['machine']['processor']}, "
        f"{r['machine']['cpu_count']} logical CPUs, bf16 hardware: {bf16_hardware_label(r)}; torch {r['machine']['torch']}.",
        "",
        "| what | fp32 | bf16 autocast | ratio fp32 / bf16 |",
        "|---|---|---|---|",
        f"| training step, residual kind, demo recipe (ms, median of {len(t['fp32'])} rounds) | "
        f"{med['fp32']:.0f} | {med['bf16']:.0f} | **{med['fp32'] / med['bf16']:.2f}×** |",
        f"| {r['tiles']} tiles of 256², `dpmpp_2m` 8 NFE (s) | {s['fp32']['sample_s']:.2f} | "
        f"{s['bf16']['sample_s']:.2f} | {s['fp32']['sample_s'] / s['bf16']['sample_s']:.2f}× |",
        f"| {r['tiles']} tiles of 256², mean (1 NFE) (s) | {s['fp32']['mean_s']:.2f} | "
        f"{s['bf16']['mean_s']:.2f} | {s['fp32']['mean_s'] / s['bf16']['mean_s']:.2f}× |",
        f"| sample PSNR against the truth (dB) | {s['fp32']['sample_psnr']:.2f} | "
        f"{s['bf16']['sample_psnr']:.2f} | |",
        f"| mean PSNR against the truth (dB) | {s['fp32']['mean_psnr']:.2f} | "
        f"{s['bf16']['mean_psnr']:.2f} | |",
        "",
        f"Rounds (ms per step): fp32 {', '.join(f'{v:.0f}' for v in t['fp32'])}; "
        f"bf16 {', '.join(f'{v:.0f}' for v in t['bf16'])}.",
        f"The bf16 output against the fp32 output of the same model and noise: sample "
        f"{d['sample_psnr']:.1f} dB (largest difference {d['sample_max_abs']:.3f} of the "
        f"range 2), mean {d['mean_psnr']:.1f} dB. Input PSNR {s['input_psnr']:.2f} dB; the model "
        f"trained {r['train_steps']} steps in fp32.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=15)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--name", default="cpu_bf16")
    args = parser.parse_args(argv)
    record = start_record(__file__, argv)
    torch.manual_seed(0)
    train_pair = demo_pair((8, 192, 192))
    times = step_times(args.rounds, args.steps_per_round)
    with tempfile.TemporaryDirectory() as tmp:
        settings = {**DEMO_SETTINGS, "steps": args.train_steps, "precision": "fp32",
                    "val_every": 10**6, "ckpt_every": 10**6}  # fmt: skip
        model = trainer.train("denoise", list(train_pair), Path(tmp) / "run", progress=False,
                              **settings)  # fmt: skip
        test_noisy, test_clean = demo_pair((args.tiles, 256, 256), origin=(64, 0, 0), noise_seed=2)
        result = sampling(model, (test_noisy, test_clean), args.tiles)
    payload = {
        "argv": sys.argv[1:] if argv is None else argv, "provenance": record,
        "machine": machine_info(record), "tiles": args.tiles,
        "train_steps": args.train_steps, "train_ms": times, "sampling": result,
    }  # fmt: skip
    publish(args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
