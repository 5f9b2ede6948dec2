#!/usr/bin/env bash
# The README's demo command: set up .venv if needed, then run the demo on synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
emdiffuse demo "$@"
