#!/usr/bin/env bash
# The whole test suite, on a fresh machine: install (scripts/bootstrap.sh, and Debian's chromium
# for the web view's test: scripts/chromium.sh), start the real Kafka and Redis
# (scripts/services.sh), run pytest against them, stop them again.
#
#   scripts/test.sh [pytest args...]
#
# Integration tests need the brokers; with CI set they fail rather than skip if the brokers are
# not there. NIMBUS_KEEP_SERVICES=1 leaves the brokers running afterwards.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
bash scripts/chromium.sh install  # the web view's browser test (Debian's chromium)
bash scripts/gotools.sh >/dev/null  # grpcurl, an independent client (tests/test_grpcurl.py)
started=0
if ! bash scripts/services.sh status >/dev/null 2>&1; then
  bash scripts/services.sh up >/dev/null
  started=1
fi
cleanup() {
  if [ "$started" = 1 ] && [ -z "${NIMBUS_KEEP_SERVICES:-}" ]; then
    bash scripts/services.sh down >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
eval "$(bash scripts/services.sh env)"
export NIMBUS_TEST_KAFKA_BROKERS="$NIMBUS_KAFKA_BROKERS"
export NIMBUS_TEST_REDIS_ADDRESS="$NIMBUS_REDIS_ADDRESS"
# Under CI the local clusters' smoke test (tests/test_cluster_scripts.py: 3 KRaft brokers and a
# Redis Cluster, ~1 min) runs too; elsewhere it runs with NIMBUS_TEST_CLUSTER=1.
if [ -n "${CI:-}" ]; then export NIMBUS_TEST_CLUSTER="${NIMBUS_TEST_CLUSTER:-1}"; fi
.venv/bin/python -m pytest "$@"
