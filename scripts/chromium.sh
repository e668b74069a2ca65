#!/usr/bin/env bash
# Debian's headless Chromium, for the test that renders report.html and screenshots it (without a browser
# that test is skipped with its reason). Idempotent; needs apt-get (Debian/Ubuntu), so a no-op elsewhere.
set -euo pipefail
for b in chromium chromium-browser google-chrome; do command -v "$b" >/dev/null && exit 0; done
if ! command -v apt-get >/dev/null; then
  echo "no apt-get: install Chromium yourself to run the report.html browser test" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq chromium >/dev/null; }
echo "installed $(chromium --version)"
