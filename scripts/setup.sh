#!/usr/bin/env bash
# Creates .venv (once) and installs emdiffuse with its dev extras into it.
# CPU machines get the CPU build of torch pinned below. GPU users: install the CUDA build of
# torch into .venv first (see README, "GPU"), this script keeps whatever torch is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${EMDIFFUSE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
python -m ipykernel install --sys-prefix --name python3 >/dev/null
