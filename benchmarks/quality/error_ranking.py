"""How well any error head could rank the posterior mean's errors on a FlyEM level: what
limits the Spearman of the uncertainty map (issue 14, target 5).

A trained residual model with an error head (the quality harness's cache, ``--model``)
keeps its mean network fixed; fresh error heads are trained on that final mean's squared
errors over the training volume (the same Gaussian likelihood as in training,
:func:`emdiffuse.models.diffusion.error_nll`, same seeds and steps for each) and score the
held-out test input like the quality report does: Spearman of the map against ``|error|``
per voxel and per 16² block (block RMS against block RMS).

- ``checkpoint``: the model's own head (for a model made since the twenty-eighth session,
  already refitted at the end of its training);
- ``as the loop left it``: the head in the run's last resumable checkpoint, before any
  refit (the same as ``checkpoint`` for older models);
- ``shipped refit, N steps``: that head refitted by the library's end-of-training refit
  (:func:`emdiffuse.training.error_refit.refit_error_head`, on the run's own training
  batches: ``--refit-steps``);
- ``refit``: the same head design trained on the final mean alone;
- ``wider``: 32 channels and dilations 1, 2, 4, 8, 16 (receptive field 63 voxels);
- ``mean features``: the mean network's last decoder features as extra input;
- ``truth only``: a head that sees the clean truth and nothing else (not available to any
  user): how much of the error the structure of the truth fixes.

For denoising, ``A vs B`` ranks the block errors of the mean on the first noise
realisation of the test volume by those on the second: how reproducible a block's error is
given the volume alone.

    python benchmarks/quality/error_ranking.py --level denoise-dose2 \\
        --model CACHE/models/flyem-denoise-dose2-residual-150s-*/model.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from quality_data import flyem_levels
from quality_plan import Entry
from quality_project import train_sources
from quality_scores import RANKING_WINDOW

from emdiffuse import metrics
from emdiffuse.models.checkpoints import load_checkpoint
from emdiffuse.models.conditioning import upsample_xy
from emdiffuse.models.device import TRAIN_PRECISIONS, autocast_dtype
from emdiffuse.models.diffusion import error_nll
from emdiffuse.models.mean_net import ErrorNet
from emdiffuse.models.networks import build_network
from emdiffuse.models.normalization import pair_from_model
from emdiffuse.training.build import build_dataset
from emdiffuse.training.degrade import blur_downsample_xy
from emdiffuse.training.error_refit import refit_error_head
from emdiffuse.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import start_record  # noqa: E402

SIDE = 240  # voxels: training slices are cropped to the test images' side
HEADS = {  # name: (channels, dilations, input)
    "refit": (16, (1, 1, 2, 4), "input"),
    "wider": (32, (1, 2, 4, 8, 16), "input"),
    "mean features": (16, (1, 1, 2, 4), "features"),
    "truth only": (16, (1, 1, 2, 4), "truth"),
}


class Fixed:
    """The model's mean network on one set of slices: its condition on the output grid, the
    mean, the last decoder features and the target, all model space (N, C, Y, X)."""

    def __init__(self, net, config, cond_raw: np.ndarray, target_raw: np.ndarray) -> None:
        cond_norm, target_norm = pair_from_model(config)
        cond = torch.from_numpy(cond_norm.forward(cond_raw, clip=True))[:, None]
        self.cond = upsample_xy(cond, config.xy_scale, config.cond_upsample)
        self.target = torch.from_numpy(target_norm.forward(target_raw))[:, None]
        features: list[torch.Tensor] = []
        hook = net.mean.up[-1].register_forward_hook(
            lambda module, args, out: features.append(out.float())
        )
        with torch.no_grad():
            self.mean = torch.cat([net.mean(self.cond[i : i + 8]).float()
                                   for i in range(0, len(self.cond), 8)])  # fmt: skip
        hook.remove()
        self.features = torch.cat(features)

    def head_input(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What a head of input ``kind`` reads: ``(condition channels, mean)``; the truth-only
        head reads the clean target in both places."""
        if kind == "truth":
            return self.target, self.target
        if kind == "features":
            return torch.cat([self.cond, self.features], 1), self.mean
        return self.cond, self.mean


def _patches(volume: torch.Tensor, cut: list[tuple]) -> torch.Tensor:
    """The ``cut`` windows (row, channels, y, x) of ``volume`` stacked as a batch."""
    return torch.stack([volume[w] for w in cut])


def train_head(train: Fixed, kind: str, channels: int, dilations, *, steps: int, seed: int,
               batch: int = 16, patch: int = 48, lr: float = 2e-3) -> ErrorNet:  # fmt: skip
    """A fresh head of input ``kind`` fitted to ``train``'s squared errors (random patches)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    cond, mean = train.head_input(kind)
    head = ErrorNet(2, cond.shape[1] + 1, 1, channels, dilations)
    optimizer = torch.optim.Adam(head.parameters(), lr)
    n, side = len(train.mean), train.mean.shape[-1]
    for _ in range(steps):
        rows = torch.randint(0, n, (batch,), generator=generator)
        ys, xs = (torch.randint(0, side - patch + 1, (batch,), generator=generator) for _ in "yx")
        cut = [(int(r), slice(None), slice(int(y), int(y) + patch), slice(int(x), int(x) + patch))
               for r, y, x in zip(rows, ys, xs, strict=True)]  # fmt: skip
        error = _patches(train.target, cut) - _patches(train.mean, cut)  # the mean's error
        loss = error_nll(head(_patches(cond, cut), _patches(mean, cut)), error)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def loop_head(net, model: Path) -> tuple[torch.nn.Module, str]:
    """The error head as the training loop left it: the averaged weights of the run
    folder's last resumable checkpoint (before the end-of-training refit), or the model's
    own head where the folder keeps none; and which it is."""
    saved = sorted((model.parent / "checkpoints").glob("step_*.pt"))
    head = copy.deepcopy(net.error)
    if not saved:
        return head, "the model's own (no checkpoint in its folder)"
    ema = torch.load(saved[-1], weights_only=True, map_location="cpu")["ema"]
    head.load_state_dict({k.removeprefix("error."): v for k, v in ema.items()
                          if k.startswith("error.")})  # fmt: skip
    return head, saved[-1].name


def shipped_refit(net, config, model: Path, data, start: torch.nn.Module, steps: int):
    """``start`` refitted for ``steps`` steps by the library's refit on the run's own
    training batches (its settings.json; the model's normalisation) in the run's precision,
    on a copy of ``net``."""
    task, sources, _ = train_sources(Entry("residual", 150), data)
    recorded = json.loads((model.parent / "settings.json").read_text())
    s = TrainSettings.build(task, ["a"], {k: v for k, v in recorded.items()
                                          if k not in ("task", "data")})  # fmt: skip
    dataset = build_dataset(s, sources, normalization={
        "condition": config.condition_normalization or config.normalization,
        "target": config.normalization})  # fmt: skip
    refitted = copy.deepcopy(net)
    refitted.error.load_state_dict(start.state_dict())
    record = refit_error_head(refitted, dataset, config, batch_size=s.batch_size, steps=steps,
                              device=torch.device("cpu"),
                              autocast=autocast_dtype(s.precision, torch.device("cpu"),
                                                      choices=TRAIN_PRECISIONS))  # fmt: skip
    return refitted.error, record


def ranking(sigma: torch.Tensor, test: Fixed) -> dict[str, float]:
    """Spearman of ``sigma`` against the mean's |error| on ``test``, per voxel and per block."""
    r = metrics.uncertainty_ranking(test.mean[:, 0].numpy(), sigma[:, 0].numpy(),
                                    test.target[:, 0].numpy(), window=RANKING_WINDOW)  # fmt: skip
    return {"voxel": round(r["spearman"], 3), "block": round(r["spearman_window"], 3),
            "perfect_map_block": round(r["ceiling_window"], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--level", required=True, help="a FlyEM denoise or super-resolve level key")
    p.add_argument("--model", required=True, type=Path, help="a residual model's .safetensors")
    p.add_argument("--steps", type=int, default=2000, help="training steps of each fresh head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS),
                   metavar="HEAD", help=f"fresh heads to fit (default all: {', '.join(HEADS)})")
    p.add_argument("--refit-steps", type=int, nargs="*", default=[350, 2000],
                   help="steps of the shipped refit rows (none: leave them out)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    p.add_argument("--name", default=None, help="file name (default: error_ranking_LEVEL)")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"no model file at {args.model}: pass a trained model's .safetensors")
    record = start_record("benchmarks/quality/error_ranking.py", argv)
    config, state = load_checkpoint(args.model)
    if not config.residual or not config.mean_net.error_channels or config.in_slices != 1:
        p.error("--model must be a one-slice residual model with an error head")
    source, levels, sizes = flyem_levels([args.level])
    level = levels[0]
    if level.task not in ("denoise", "super-resolve"):
        p.error("--level must be a denoise or super-resolve level")
    net = build_network(config)
    net.load_state_dict(state)
    net.eval()
    data = source.task_data(level, sizes, source.train_volume(sizes))
    clean = data.train["clean"][::2, :SIDE, :SIDE]
    if level.task == "denoise":
        degraded = data.train["noisy"][::2, :SIDE, :SIDE]
    else:
        degraded = blur_downsample_xy(clean, level.factor)
    train = Fixed(net, config, degraded, clean)
    tests = [Fixed(net, config, t, data.truth) for t in data.test_inputs]
    test = tests[0]
    started = time.perf_counter()
    rows = []
    with torch.no_grad():
        own = torch.exp(0.5 * net.error(*test.head_input("input")))
    rows.append({"head": "checkpoint", **ranking(own, test)})
    start, where = loop_head(net, args.model)
    with torch.no_grad():
        sigma = torch.exp(0.5 * start(*test.head_input("input")))
    rows.append({"head": "as the loop left it", "from": where, **ranking(sigma, test)})
    for steps in args.refit_steps:
        head, refit = shipped_refit(net, config, args.model, data, start, steps)
        with torch.no_grad():
            sigma = torch.exp(0.5 * head(*test.head_input("input")))
        rows.append({"head": f"shipped refit, {steps} steps", **ranking(sigma, test),
                     "train_s": round(refit.seconds, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    for name in args.heads:
        channels, dilations, kind = HEADS[name]
        t0 = time.perf_counter()
        head = train_head(train, kind, channels, dilations, steps=args.steps, seed=args.seed)
        with torch.no_grad():
            sigma = torch.exp(0.5 * head(*test.head_input(kind)))
        rows.append({"head": name, "channels": channels, "dilations": list(dilations),
                     "input": kind, **ranking(sigma, test),
                     "train_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    reproducible = None
    if len(tests) > 1:  # B's |error| as the map: how B's block errors rank A's
        b_error = (tests[1].mean - tests[1].target).abs()
        reproducible = ranking(b_error, test)["block"]
    lines = ["| head | input | voxel Spearman | 16² block Spearman | perfect map (block) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        what = {"input": "condition, mean", "features": "condition, mean, mean-network "
                "features", "truth": "the clean truth only"}.get(row.get("input"), "condition, mean")  # fmt: skip
        lines.append(f"| {row['head']} | {what} | {row['voxel']:.3f} | {row['block']:.3f} | "
                     f"{row['perfect_map_block']:.3f} |")  # fmt: skip
    if reproducible is not None:
        lines.append(
            f"| A vs B (noise realisation B's block errors) | — | — | {reproducible:.3f} | — |"
        )
    table = "\n".join(lines)
    print(table)
    result = {"level": args.level, "model": args.model.parent.name, "steps": args.steps,
              "rows": rows, "block_error_a_vs_b": reproducible,
              "seconds": round(time.perf_counter() - started), "provenance": record}  # fmt: skip
    name = args.name or f"error_ranking_{args.level}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(
        f"# How well an error head can rank the mean's errors, FlyEM {args.level}\n\n"
        f"Model: `{args.model.parent.name}` (its mean network fixed). Shipped refit: the "
        f"library's end-of-training refit of the head as the loop left it ({where}), on the "
        f"run's own unaugmented training batches. Fresh heads: {args.steps} steps each, batch "
        f"16, 48² patches, every second slice of `training_sample1`. Scored on the first test "
        f"input. Command: `python benchmarks/quality/error_ranking.py --level {args.level} "
        f"--model <that model> --heads {' '.join(args.heads)} --refit-steps "
        f"{' '.join(map(str, args.refit_steps))}`.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
