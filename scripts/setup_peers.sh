#!/usr/bin/env bash
# Set up .venv-peers: CAREamics (Noise2Void, CARE), the external peer of the quality benchmark
# (benchmarks/quality). Only that benchmark needs it; the project and its tests do not.
#
# CAREamics 0.3.5 caps torchvision at 0.26 (= torch 2.11); we keep the project's torch 2.13 and
# its matching torchvision 0.28 (CAREamics' N2V and CARE use no torchvision code; only its
# LVAE and bioimage export import it). The torchvision wheels on PyPI link against the CUDA
# build of torch, so this venv takes the CUDA torch from PyPI even on a CPU machine (~3 GB);
# it runs on the CPU there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-peers
TORCH="${EMDIFFUSE_PEERS_TORCH:-torch==2.13.0}"
TORCHVISION="${EMDIFFUSE_PEERS_TORCHVISION:-torchvision==0.28.0}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
# CAREamics itself without its pins, then its dependencies with ours
"$PIP" install -q --no-deps careamics==0.3.5
"$PIP" install -q "bioimageio-core>=0.9.0,<=0.11.0" "lightning>=2.2,<=2.6.6" matplotlib \
    "microssim<=0.0.5" numpy pillow psutil "pydantic>=2.11" pyyaml scikit-image tifffile \
    "torchmetrics<1.9.0" "zarr>=3"
# the torch build that PyPI's torchvision links against (a local CPU-only wheel would be
# preferred by a pip configured with find-links, so bypass the local configuration here)
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PIP" install -q "$TORCH" "$TORCHVISION"
"$VENV/bin/python" -c "import careamics, torch, torchvision; \
print('CAREamics', careamics.__version__, 'torch', torch.__version__, 'in', '$VENV')"
