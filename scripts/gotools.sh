#!/usr/bin/env bash
# Go tools the tests drive as independent gRPC clients, built from the Go module proxy with
# `go install` into .local/go-bin (pinned versions; built once, then reused).
#
#   scripts/gotools.sh            install every tool below; prints the folder
#   scripts/gotools.sh grpcurl    install one; prints its path
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.local/go-bin"
declare -A TOOLS=(
  [grpcurl]="github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4"
)
install_one() {
  local name="$1" module="${TOOLS[$1]:-}"
  [ -n "$module" ] || { echo "gotools: unknown tool $name (known: ${!TOOLS[*]})" >&2; exit 2; }
  if [ ! -x "$bin/$name" ]; then
    command -v go >/dev/null 2>&1 || { echo "gotools: go is not installed (needed for $name)" >&2; exit 3; }
    mkdir -p "$bin"
    echo "gotools: building $module into $bin (once)" >&2
    GOBIN="$bin" GOFLAGS=-mod=mod go install "$module" >&2
  fi
}
if [ $# -eq 0 ]; then
  for t in "${!TOOLS[@]}"; do install_one "$t"; done
  echo "$bin"
else
  install_one "$1"
  echo "$bin/$1"
fi
