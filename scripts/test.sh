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
cluster_started=0
cleanup() {
  if [ "$cluster_started" = 1 ] && [ -z "${NIMBUS_KEEP_SERVICES:-}" ]; then
    bash scripts/cluster.sh down >/dev/null 2>&1 || true
  fi
  if [ "$started" = 1 ] && [ -z "${NIMBUS_KEEP_SERVICES:-}" ]; then
    bash scripts/services.sh down >/dev/null 2>&1 || true
  fi
}
if ! bash scripts/services.sh status >/dev/null 2>&1; then
  bash scripts/services.sh up >/dev/null
  started=1
fi
trap cleanup EXIT
eval "$(bash scripts/services.sh env)"
export NIMBUS_TEST_KAFKA_BROKERS="$NIMBUS_KAFKA_BROKERS"
export NIMBUS_TEST_REDIS_ADDRESS="$NIMBUS_REDIS_ADDRESS"
# Under CI the local clusters (scripts/cluster.sh: 3 KRaft brokers and a Redis Cluster of 3
# masters + 3 replicas, ~20 s to start) run too, for the tests that need them (the state contract
# on Redis Cluster, tests/test_cluster_scripts.py, the cluster chaos run); elsewhere with
# NIMBUS_TEST_CLUSTER=1. Their addresses: NIMBUS_TEST_KAFKA_CLUSTER, NIMBUS_TEST_REDIS_CLUSTER.
if [ -n "${CI:-}" ]; then export NIMBUS_TEST_CLUSTER="${NIMBUS_TEST_CLUSTER:-1}"; fi
if [ "${NIMBUS_TEST_CLUSTER:-}" = 1 ]; then
  if ! bash scripts/cluster.sh status >/dev/null 2>&1; then
    cluster_started=1
    bash scripts/cluster.sh up >/dev/null
  fi
  cluster_env="$(bash scripts/cluster.sh env 2>/dev/null)"
  NIMBUS_TEST_KAFKA_CLUSTER="$(sed -n 's/.*NIMBUS_KAFKA_BROKERS=\([^ ]*\).*/\1/p' <<<"$cluster_env")"
  NIMBUS_TEST_REDIS_CLUSTER="$(sed -n 's/.*NIMBUS_REDIS_ADDRESS=\([^ ]*\).*/\1/p' <<<"$cluster_env")"
  export NIMBUS_TEST_KAFKA_CLUSTER NIMBUS_TEST_REDIS_CLUSTER
fi
.venv/bin/python -m pytest "$@"
