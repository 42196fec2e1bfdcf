#!/usr/bin/env bash
# Go tools the tests and benchmarks drive as independent gRPC clients, into .local/go-bin:
#  - pinned tools from the Go module proxy, with `go install` (built once, then reused);
#  - nimbus-loadgen, the load generator in loadgen/ (its own module; go.sum committed, so
#    -mod=readonly), built with `go build` and rebuilt whenever a file of loadgen/ is newer
#    than the binary.
#
#   scripts/gotools.sh                  build every tool below; prints the folder
#   scripts/gotools.sh grpcurl          build one; prints its path
#   scripts/gotools.sh nimbus-loadgen
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.local/go-bin"
declare -A TOOLS=(
  [grpcurl]="github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4"
)
# Built from this repository: name -> folder (a Go module with a main package).
declare -A LOCAL=(
  [nimbus-loadgen]="loadgen"
)
need_go() {
  command -v go >/dev/null 2>&1 || { echo "gotools: go is not installed (needed for $1)" >&2; exit 3; }
}
install_one() {
  local name="$1" module="${TOOLS[$1]:-}"
  if [ -n "${LOCAL[$name]:-}" ]; then
    build_local "$name"
    return
  fi
  [ -n "$module" ] || { echo "gotools: unknown tool $name (known: ${!TOOLS[*]} ${!LOCAL[*]})" >&2; exit 2; }
  if [ ! -x "$bin/$name" ]; then
    need_go "$name"
    mkdir -p "$bin"
    echo "gotools: building $module into $bin (once)" >&2
    GOBIN="$bin" GOFLAGS=-mod=mod go install "$module" >&2
  fi
}
build_local() {
  local name="$1" src="$root/${LOCAL[$1]}" out="$bin/$1"
  if [ -x "$out" ] && [ -z "$(find "$src" -type f -newer "$out" -print -quit)" ]; then
    return # up to date
  fi
  need_go "$name"
  mkdir -p "$bin"
  echo "gotools: building $name from ${LOCAL[$1]}/ into $bin" >&2
  # A temporary name, then a rename: a run that reads the old binary meanwhile is not disturbed.
  (cd "$src" && go build -mod=readonly -trimpath -o "$out.tmp.$$" .) >&2
  mv -f "$out.tmp.$$" "$out"
}
if [ $# -eq 0 ]; then
  for t in "${!TOOLS[@]}" "${!LOCAL[@]}"; do install_one "$t"; done
  echo "$bin"
else
  install_one "$1"
  echo "$bin/$1"
fi
