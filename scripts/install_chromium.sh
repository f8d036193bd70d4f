#!/usr/bin/env bash
# Debian's headless Chromium for the report's browser test; skipped where apt is not ours.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "note: chromium not installed (needs root + apt); the browser test will be skipped" >&2
fi
