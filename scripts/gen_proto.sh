#!/usr/bin/env bash
# Regenerate nimbus/proto_gen/ from protocols/*.proto with betterproto (grpcio-tools as protoc).
# Generated into a temporary folder first and moved into place only when every step succeeded:
# a failure leaves the committed tree as it was. The betterproto plugin
# (protoc-gen-python_betterproto) is looked for beside $PYTHON (the project's .venv/bin), so
# nothing needs to be on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/nimbus/proto_gen}"
py="${PYTHON:-python}"
pybin="$(dirname "$(command -v "$py")")"
export PATH="$pybin:$PATH"
if ! command -v protoc-gen-python_betterproto >/dev/null 2>&1; then
  echo "gen_proto: protoc-gen-python_betterproto not found beside $py; run scripts/bootstrap.sh" >&2
  exit 1
fi
tmp="$(mktemp -d "${TMPDIR:-/tmp}/nimbus-proto.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -I "$root/protocols" --python_betterproto_out="$tmp" "$root"/protocols/*.proto
touch "$tmp/__init__.py"
# Plain protobuf descriptors too: grpclib's reflection service finds our service through them.
"$py" -m grpc_tools.protoc -I "$root/protocols" --python_out="$tmp" "$root"/protocols/*.proto
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
chmod 755 "$out"
trap - EXIT
