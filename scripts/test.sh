#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then lint, build the docs (warnings are
# errors) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ -f scripts/install_browser.sh ]; then
  bash scripts/install_browser.sh || echo "chromium could not be installed: the browser test will be skipped"
fi
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mkdocs build --strict -q -d "${TMPDIR:-/tmp}/emdiffuse-site"
# two test processes: most tests wait on subprocesses, clusters and files as much as they compute
python -m pytest -q -n 2 "$@"
