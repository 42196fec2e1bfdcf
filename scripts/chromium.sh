#!/usr/bin/env bash
# Headless Chromium for the web view's browser test (tests/test_web.py): Debian's `chromium`
# package, installed with apt-get when /usr/bin/chromium is missing (as scripts/redis.sh does for
# redis-server). Playwright's Python package drives it; no browser build is ever downloaded.
#
# Usage: scripts/chromium.sh install
set -euo pipefail

log() { echo "[chromium] $*" >&2; }
die() { echo "[chromium] ERROR: $*" >&2; exit 1; }

cmd_install() {
  if [[ -x /usr/bin/chromium ]]; then
    return 0
  fi
  log "/usr/bin/chromium not found; installing Debian's chromium package with apt-get"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "chromium missing and not root (no sudo); install the chromium package"
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
  [[ -x /usr/bin/chromium ]] || die "/usr/bin/chromium still missing after apt-get install"
}

case "${1:-}" in
  install) cmd_install ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
