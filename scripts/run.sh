#!/usr/bin/env bash
# Nimbus all-in-one on the embedded engine, on a fresh machine: install, then `python -m nimbus`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
exec .venv/bin/python -m nimbus "$@"
