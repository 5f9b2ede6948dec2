"""Is a residual model's mean network still learning? Its body's activity, model by model.

The mean network of the residual kind is a 1×1 skip (condition → output, fitted by least
squares before training) plus a UNet body whose output layer starts at zero. If the body's
activations blow up early in training, its last block can end all-negative under SiLU: the
body's output is then ~0 for every input, for good, and the model is its linear skip
(for isotropic ×4 on FlyEM: linear interpolation, ~0.7 dB below a working mean).

For each model (a ``model.safetensors`` or a harness cache folder) this runs the mean
network on a fixed crop of the FlyEM training volume (the model's input slices, 4 apart)
and reports the standard deviation of the body's bottom features, of its last block and
of its output (model space), and flags a collapse (body output std < 0.01; working models
here measure 0.07-0.38). Prints a table, writes JSON and markdown.

    python benchmarks/quality/mean_activity.py /tmp/qcache/models/flyem-isotropic-k4-* \\
        --name mean_activity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from quality_data import flyem_levels

from emdiffuse.models.enhancer import Enhancer

ROOT = Path(__file__).resolve().parents[2]
COLLAPSED_BELOW = 0.01  # body output std (model space) under which the body does nothing


def activity(enhancer: Enhancer, volume: np.ndarray) -> dict[str, float]:
    """Std of the mean network's bottom features, last block and body output on a crop of
    ``volume`` laid out as the model's condition."""
    c = enhancer.config
    raw = volume[100 : 100 + 4 * c.in_slices : 4, :96, :96]
    cond = torch.from_numpy(np.clip(enhancer.condition_normalization.forward(raw), -1, 1)[None])
    if c.xy_scale > 1:  # a low-resolution input on the output grid, as enhance gives it
        cond = enhancer._upsample(cond[..., :: c.xy_scale, :: c.xy_scale].contiguous())
    net, seen = enhancer.net.mean, {}
    hooks = [net.bottom.register_forward_hook(lambda m, i, o: seen.__setitem__("bottom", o)),
             net.up[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o))]  # fmt: skip
    with torch.no_grad():
        net(cond.float())
        body = net.out(seen["last"])
    for hook in hooks:
        hook.remove()
    return {"bottom_std": float(seen["bottom"].std()), "last_std": float(seen["last"].std()),
            "body_std": float(body.std())}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model.safetensors files or folders")
    p.add_argument("--name", default="mean_activity", help="results file stem")
    args = p.parse_args(argv)
    source, _, sizes = flyem_levels(["isotropic-k4"])
    volume = source.train_volume(sizes).astype(np.float32)
    rows = []
    for path in args.models:
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            continue
        enhancer = Enhancer.load(file, device="cpu", precision="fp32")
        if not enhancer.config.residual:
            continue
        meta = file.parent / "meta.json"
        steps = json.loads(meta.read_text()).get("steps") if meta.is_file() else None
        a = activity(enhancer, volume)
        rows.append({"model": file.parent.name, "describe": enhancer.config.describe(),
                     "steps": steps, **a, "collapsed": a["body_std"] < COLLAPSED_BELOW})  # fmt: skip
    lines = ["| model | steps | bottom std | last block std | body output std | collapsed |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['bottom_std']:.2f} | "
                     f"{r['last_std']:.4f} | {r['body_std']:.4f} | {'**yes**' if r['collapsed'] else 'no'} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / "quality"
    (out / f"{args.name}.json").write_text(
        json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1)
    )
    (out / f"{args.name}.md").write_text(
        f"# Mean-network activity ({args.name})\n\n`python benchmarks/quality/mean_activity.py "
        f"…` (see its docstring). A body output std below {COLLAPSED_BELOW} means the mean "
        f"network's body has died and the model is its linear skip.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
