#!/usr/bin/env bash
# Install headless Chromium for tests/viewer/test_view_browser.py (Debian). Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium missing; run as root: apt-get install -y chromium" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
echo "chromium installed: $(command -v chromium)"
