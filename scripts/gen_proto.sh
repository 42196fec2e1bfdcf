#!/usr/bin/env bash
# Regenerate nimbus/proto_gen/ from protocols/*.proto with betterproto (grpcio-tools as protoc).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/nimbus/proto_gen}"
py="${PYTHON:-python}"
rm -rf "$out"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I "$root/protocols" --python_betterproto_out="$out" "$root"/protocols/*.proto
touch "$out/__init__.py"
# Plain protobuf descriptors too: grpclib's reflection service finds our service through them.
"$py" -m grpc_tools.protoc -I "$root/protocols" --python_out="$out" "$root"/protocols/*.proto
