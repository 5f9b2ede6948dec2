"""Where a training step's time goes, and what the fused optimizer saves.

The mean-plus-residual model trains two networks in one step; CAREamics CARE trains one,
CARE-sized like our mean network, and so runs more steps in the same wall time (the quality
benchmark's "steps" column). This benchmark measures, on the machine it runs on, ms per
optimisation step of the residual kind with the demo's recipe (tiny preset, its batch and
residual batch, 48² patches, the shipping precision ``auto``), in alternating rounds of the
same pre-drawn batches so that drift of the machine's load hits every variant alike:

* the full step with AdamW's per-parameter loop (torch's CPU default, the trainer before)
  and with the fused kernel (:func:`emdiffuse.training.build.make_optimizer`, the trainer now);
* the mean network alone (``mean_only``, the warm-up's step): what a CARE-like step costs;
* the full step with the SSIM term in the mean network's loss (``mean_ssim`` 0.1, thirty-
  second session), as the library computes it (one separable filtering of the five stacked
  moment maps) and through ``kornia.metrics.ssim`` (its first version: five filterings,
  each padded and cropped), to show what the term costs;
* the EMA update, timed on its own;

and checks that the two optimizers train to the same weights (largest parameter difference
after the timed steps, both from the same start).

    python benchmarks/train_step.py [--rounds 5] [--steps-per-round 15]

Writes ``results/train_step.{json,md}`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from common import bf16_hardware_label, machine_info, publish, start_record

from emdiffuse.models import diffusion
from emdiffuse.models.device import TRAIN_PRECISIONS, autocast_dtype
from emdiffuse.models.diffusion import Schedule
from emdiffuse.models.ema import EMA
from emdiffuse.training import build
from emdiffuse.training.demo_model import demo_pair
from emdiffuse.training.settings import DEMO_SETTINGS, TrainSettings
from emdiffuse.training.step import train_step

VARIANTS = (
    "loop AdamW",
    "fused AdamW",
    "mean network alone",
    "SSIM term 0.1",
    "SSIM term 0.1, kornia.metrics.ssim",
)
SSIM_WEIGHT = 0.1  # the weight the thirty-second session ran for 20 min


def kornia_ssim_loss(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SSIM term as the thirty-second session first computed it: ``kornia.metrics.ssim``
    on the [0, 1] scale, valid region, in float32."""
    from kornia.metrics import ssim

    with torch.autocast(estimate.device.type, enabled=False):
        a = (estimate.float().reshape(-1, 1, *estimate.shape[-2:]) + 1) / 2
        b = (target.float().reshape(-1, 1, *target.shape[-2:]) + 1) / 2
        return 1 - ssim(a, b, 11, max_val=1.0, padding="valid").mean()


def round_times(steps: dict[str, Callable[[dict], None]], batches: list[dict], rounds: int,
                warmup: int = 2) -> dict[str, list[float]]:  # fmt: skip
    """ms per call of each ``steps[name](batch)``, one list entry per round; each round runs
    every variant over the same ``batches`` (the first ``warmup`` untimed: oneDNN picks its
    kernels)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for batch in batches[:warmup]:
                step(batch)
            t0 = time.perf_counter()
            for batch in batches[warmup:]:
                step(batch)
            times[name].append(1000 * (time.perf_counter() - t0) / (len(batches) - warmup))
    return times


def demo_recipe(batches: int) -> tuple[TrainSettings, object, Schedule, list[dict]]:
    """The demo recipe's settings, model config and schedule, and ``batches`` pre-drawn
    batches of its training data (the recipe's ``batch_size`` patches each)."""
    s = TrainSettings(task="denoise", data=["noisy", "clean"], **{**DEMO_SETTINGS, "steps": 10**4})
    dataset = build.build_dataset(s, list(demo_pair((8, 192, 192))))
    config = build.build_config(s, dataset, None)
    schedule = Schedule.from_dict(dict(config.schedule))
    n = s.batch_size
    return s, config, schedule, [dataset.batch(range(i * n, i * n + n)) for i in range(batches)]


def measure(rounds: int, per_round: int) -> dict:
    s, config, schedule, batches = demo_recipe(per_round + 2)
    dev = torch.device("cpu")
    dtype = autocast_dtype(s.precision, dev, choices=TRAIN_PRECISIONS)
    nets, steps = {}, {}
    for name in VARIANTS:
        net = build.build_net(config, s.seed)
        fused = name != "loop AdamW"
        optimizer = (build.make_optimizer(net, s, dev) if fused
                     else torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay))  # fmt: skip
        ema = EMA(net, s.ema_decay)
        mean_only = name == "mean network alone"
        settings = replace(s, mean_ssim=SSIM_WEIGHT) if name.startswith("SSIM") else s
        ssim_loss = kornia_ssim_loss if "kornia" in name else diffusion.ssim_loss

        def step(batch, net=net, optimizer=optimizer, ema=ema, mean_only=mean_only,
                 settings=settings, ssim_loss=ssim_loss) -> None:  # fmt: skip
            library = diffusion.ssim_loss
            diffusion.ssim_loss = ssim_loss  # what _mean_part calls
            try:
                train_step(net, net, optimizer, batch, schedule, config, settings, dev, dtype,
                           mean_only)  # fmt: skip
            finally:
                diffusion.ssim_loss = library
            ema.update(net)

        nets[name], steps[name] = net, step
    ema_net = EMA(nets["fused AdamW"], s.ema_decay)
    steps["EMA update"] = lambda batch: ema_net.update(nets["fused AdamW"])
    times = round_times(steps, batches, rounds)
    return {"train_ms": times, "precision": str(dtype), "batch_size": s.batch_size,
            "residual_batch": s.residual_batch,
            "one_step_fp32": optimizer_agreement(config, schedule, s, batches[0])}  # fmt: skip


def optimizer_agreement(config, schedule, s: TrainSettings, batch: dict) -> dict[str, float]:
    """One fp32 step of loop and fused AdamW from the same weights on the same batch: the
    largest difference of the updated weights, and the largest update (parameters only:
    batch norm's running statistics and step counter are buffers, not the optimizer's)."""
    dev, after, start = torch.device("cpu"), {}, None
    for fused in (False, True):
        net = build.build_net(config, s.seed)
        start = {k: v.detach().clone() for k, v in net.named_parameters()}
        optimizer = (build.make_optimizer(net, s, dev) if fused
                     else torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay))  # fmt: skip
        train_step(net, net, optimizer, batch, schedule, config, s, dev, None)
        after[fused] = {k: v.detach() for k, v in net.named_parameters()}
    difference = max(float((after[False][k] - after[True][k]).abs().max()) for k in start)
    update = max(float((after[False][k] - start[k]).abs().max()) for k in start)
    return {"max_difference": difference, "max_update": update}


def recipe_batch(r: dict) -> str:
    """The batch the steps were timed on, as the table's header says it (results written
    before the field: the batch of 8 they used)."""
    n, k = r.get("batch_size", 8), r.get("residual_batch")
    return f"batch {n}" if k is None else f"batch {n}, the residual network on {k} of it"


def markdown(r: dict) -> str:
    med = {k: statistics.median(v) for k, v in r["train_ms"].items()}
    full = med["fused AdamW"]
    lines = [
        "# A training step: where its time goes, and the fused optimizer",
        "",
        f"`python benchmarks/train_step.py {' '.join(r['argv'])}`; {r['machine']['processor']}, "
        f"{r['machine']['cpu_count']} logical CPUs, bf16 hardware: {bf16_hardware_label(r)}; torch "
        f"{r['machine']['torch']}; autocast {r['precision']}. Residual kind, the demo's recipe "
        f"(tiny preset, {recipe_batch(r)}, 48² patches); median of the rounds.",
        "",
        "| step | ms | steps/s | vs the fused step |",
        "|---|---|---|---|",
    ]
    for name in (*VARIANTS, "EMA update"):
        ms = med[name]
        lines.append(f"| {name} | {ms:.1f} | {1000 / ms:.1f} | {ms / full:.2f}× |")
    lines += [
        "",
        f"Fused against loop AdamW: **{med['loop AdamW'] / full:.2f}×** the steps in the same "
        f"time. The residual network's share of a step: {100 * (1 - med['mean network alone'] / full):.0f} %.",
    ]
    if "SSIM term 0.1" in med:  # results written before the thirty-third session have none
        ssim, kornia = med["SSIM term 0.1"], med["SSIM term 0.1, kornia.metrics.ssim"]
        lines.append(
            f"The SSIM term adds {ssim - full:.1f} ms to a step ({100 * (ssim / full - 1):.0f} %); "
            f"through kornia.metrics.ssim {kornia - full:.1f} ms "
            f"({100 * (kornia / full - 1):.0f} %)."
        )
    lines += [
        "Rounds (ms per step): "
        + "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in vs)}" for k, vs in r["train_ms"].items())
        + ".",
        f"One fp32 step from the same weights on the same batch: loop and fused AdamW's "
        f"weights differ by at most {r['one_step_fp32']['max_difference']:.1e}, where the "
        f"step moved a weight by up to {r['one_step_fp32']['max_update']:.1e}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=15)
    parser.add_argument("--name", default="train_step")
    args = parser.parse_args(argv)
    record = start_record(__file__, argv)
    torch.manual_seed(0)
    result = measure(args.rounds, args.steps_per_round)
    payload = {"argv": sys.argv[1:] if argv is None else argv, "provenance": record,
               "machine": machine_info(record), **result}  # fmt: skip
    publish(args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
