#!/usr/bin/env bash
# Start/stop the local backing services for Nimbus (no Docker):
# a single-node Kafka 4.x broker (scripts/kafka.sh) and redis-server (scripts/redis.sh).
#
# Usage: scripts/services.sh <command>
#   up       start both (installing what is missing), wait until ready, print the env vars
#   down     stop both (no-op for what is not running)
#   status   print both states; exit 0 only when both are running
#   env      print the env vars, e.g. `eval "$(scripts/services.sh env)"`
#
# Ports come from NIMBUS_KAFKA_PORT (19092), NIMBUS_KAFKA_CONTROLLER_PORT (19093) and
# NIMBUS_REDIS_PORT (16379); everything lives under <repo>/.local/.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA="$SCRIPT_DIR/kafka.sh"
REDIS="$SCRIPT_DIR/redis.sh"
LOG_TAG=services
# shellcheck source=scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"

print_env() {
  echo "export $("$KAFKA" env)"
  echo "export $("$REDIS" env)"
}

case "${1:-}" in
  up)
    "$REDIS" start
    "$KAFKA" start
    echo "# services are up; use:" >&2
    print_env
    ;;
  down)
    rc=0
    "$KAFKA" stop || rc=$?
    "$REDIS" stop || rc=$?
    exit "$rc"
    ;;
  status)
    rc=0
    "$KAFKA" status || rc=$?
    "$REDIS" status || rc=$?
    exit "$rc"
    ;;
  env)
    print_env
    ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
