#!/usr/bin/env bash
# One command for a GPU machine: set up .venv if needed (keeping a CUDA torch already in it,
# see the README's "GPU users"), then run benchmarks/gpu.py (< 5 min on one GPU, no
# downloads), which writes benchmarks/results/gpu.{json,md}. Options pass through, e.g.
#   bash benchmarks/gpu.sh --compile off        bash benchmarks/gpu.sh --smoke --out /tmp/g
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python benchmarks/gpu.py "$@"
