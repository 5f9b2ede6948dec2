"""Where a network evaluation's GPU time goes: torch.profiler over the reference-size UNet.

    python benchmarks/gpu_profile.py [--batch 16] > benchmarks/results/gpu_profile.txt

The ``reference`` preset of ``emdiffuse-n`` with seeded random weights (as
:mod:`gpu` builds it), one batch of 256² tiles, bf16 autocast, eager: three warm-up
forwards, then three profiled ones; prints the operators with the most CUDA time.
CUDA only.
"""

from __future__ import annotations

import argparse

import torch
from gpu import batch_inputs, make_network
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=22)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    net, config = make_network("reference", device)
    x, level = batch_inputs(config, args.batch, 256, device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            net(x, level)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                net(x, level)
            torch.cuda.synchronize()
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; reference UNet, "
          f"batch {args.batch} of 256², bf16 autocast, eager; 3 profiled forwards")  # fmt: skip
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))  # fmt: skip


if __name__ == "__main__":
    main()
