#!/usr/bin/env bash
# Headless Chromium for the web view's browser test (tests/test_web.py): Debian's `chromium`
# package, installed with apt-get when /usr/bin/chromium is missing (as scripts/redis.sh does for
# redis-server). Playwright's Python package drives it; no browser build is ever downloaded.
#
# Usage: scripts/chromium.sh install
set -euo pipefail

LOG_TAG=chromium
# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

case "${1:-}" in
  install) apt_install chromium /usr/bin/chromium ;;
  *) usage >&2; exit 2 ;;
esac
