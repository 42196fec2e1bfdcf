#!/usr/bin/env bash
# Local single-node Apache Kafka 4.x (KRaft, combined broker+controller, no ZooKeeper,
# no Docker) for Nimbus development and tests.
#
# Usage: scripts/kafka.sh <command> [args]
#   install          fetch the Kafka jars from Maven Central (mvn, scripts/kafka/pom.xml)
#                    into .local/kafka/libs (no-op when already installed)
#   start            install if needed, write config, format storage on first use,
#                    start the broker in the background and wait until it answers
#                    (no-op + wait when already running)
#   wait             wait until the running broker answers metadata requests
#   status           print state; exit 0 when running, 3 when stopped
#   stop             SIGTERM, wait, then SIGKILL (no-op when not running)
#   kill9            SIGKILL the broker (chaos tests); `start` afterwards recovers
#   restart          stop + start
#   env              print NIMBUS_KAFKA_BROKERS=127.0.0.1:<port>
#   logs [N]         tail the last N (default 100) lines of the server log
#   reset            stop and delete data + config (keeps the downloaded jars)
#   perf-produce ... java org.apache.kafka.tools.ProducerPerformance ...
#   perf-consume ... java org.apache.kafka.tools.ConsumerPerformance ...
#   topics ...       java org.apache.kafka.tools.TopicCommand ...   (kafka-topics.sh)
#   run-class C ...  java C ... with the Kafka jars on the classpath
#
# perf-produce/perf-consume/topics get `--bootstrap-server 127.0.0.1:<port>` appended
# when the arguments do not mention bootstrap servers themselves, e.g.
#   scripts/kafka.sh topics --create --topic perf --partitions 8
#   scripts/kafka.sh perf-produce --topic perf --num-records 100000 --record-size 100 --throughput -1
#   scripts/kafka.sh perf-consume --topic perf --num-records 100000
# (Kafka 4.4 deprecates --producer-props in favour of --command-property and
# ConsumerPerformance --messages in favour of --num-records.)
#
# Environment:
#   NIMBUS_KAFKA_PORT             client (PLAINTEXT) port, default 19092
#   NIMBUS_KAFKA_CONTROLLER_PORT  KRaft controller port, default 19093
#   NIMBUS_KAFKA_HEAP_OPTS        default "-Xms256m -Xmx512m"
#   NIMBUS_KAFKA_AUTO_CREATE_TOPICS  true|false, default true (see below)
#   NIMBUS_KAFKA_START_TIMEOUT    seconds to wait for readiness, default 90
#   NIMBUS_KAFKA_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL, default 30
#   NIMBUS_KAFKA_VERSION          override <kafka.version> of the pom at install time
#   NIMBUS_KAFKA_PYTHON           python used for the kafka-python readiness check, default python3
#   NIMBUS_LOCAL_DIR              state root, default <repo>/.local
#
# Broker settings: num.partitions=8, auto.create.topics.enable=true by default (a
# producer/consumer touching an unknown topic creates it with 8 partitions, which is
# the convenient behaviour for a dev/test broker; set NIMBUS_KAFKA_AUTO_CREATE_TOPICS=false
# to make tests prove that topics are created explicitly), replication factor 1
# everywhere (offsets, transactions, share-group state), group.initial.rebalance.delay.ms=0.
# Like any Kafka broker it does not fsync per message (durability comes from the page
# cache; a kill -9 of the JVM loses nothing acknowledged, a host crash could).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=kafka
# shellcheck source=scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"  # sets ROOT and LOCAL_DIR
# shellcheck source=scripts/kafka_lib.sh
source "$SCRIPT_DIR/kafka_lib.sh"

POM="$SCRIPT_DIR/kafka/pom.xml"

KDIR="$LOCAL_DIR/kafka"
LIBS="$KDIR/libs"
CONF_DIR="$KDIR/config"
DATA_DIR="$KDIR/data"
LOG_DIR="$KDIR/logs"
PID_FILE="$KDIR/kafka.pid"
CLUSTER_ID_FILE="$KDIR/cluster.id"
SERVER_PROPS="$CONF_DIR/server.properties"
TOOLS_LOG4J="$CONF_DIR/tools-log4j2.xml"
SERVER_LOG="$LOG_DIR/server.log"
STDOUT_LOG="$LOG_DIR/kafka.out"
START_MARK="$KDIR/start.logpos"
STAMP="$LIBS/.nimbus-installed"
PORT_FILE="$KDIR/kafka.port"

HOST=127.0.0.1
PORT="${NIMBUS_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${NIMBUS_KAFKA_CONTROLLER_PORT:-19093}"
HEAP_OPTS="${NIMBUS_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
TOOL_HEAP=-Xmx512m
AUTO_CREATE="${NIMBUS_KAFKA_AUTO_CREATE_TOPICS:-true}"
START_TIMEOUT="${NIMBUS_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${NIMBUS_KAFKA_STOP_TIMEOUT:-30}"
BOOTSTRAP="$HOST:$PORT"

LOCK_DIR="$KDIR"

kafka_version() {
  if [[ -n "${NIMBUS_KAFKA_VERSION:-}" ]]; then
    echo "$NIMBUS_KAFKA_VERSION"
  else
    sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1
  fi
}

# Fingerprint of what is installed: pom content + version override.
install_fingerprint() {
  { cat "$POM"; echo "version=$(kafka_version)"; } | sha256sum | cut -d' ' -f1
}

is_installed() {
  [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(install_fingerprint)" ]]
}

# ---------------------------------------------------------------- process helpers

# pid of our broker if it is alive (checks the command line, so a recycled pid of
# an unrelated process is not mistaken for the broker), else empty.
broker_pid() { pid_if_ours "$PID_FILE" kafka.Kafka "$SERVER_PROPS"; }

is_running() { [[ -n "$(broker_pid)" ]]; }

have_kafka_python() { "$PYTHON" -c 'import kafka' >/dev/null 2>&1; }

# A real Kafka metadata round trip (kafka-python), used when kafka-python is importable.
# stdout/stderr of the last attempt go to $KDIR/wait-check.err for diagnostics.
metadata_ok() {
  timeout 20 "$PYTHON" - "$BOOTSTRAP" >"$KDIR/wait-check.err" 2>&1 <<'PY'
import sys, logging
logging.disable(logging.CRITICAL)
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], client_id="nimbus-kafka-wait",
                         request_timeout_ms=5000)
try:
    admin.list_topics()
    admin.describe_cluster()
finally:
    admin.close()
PY
}

# "Kafka Server started" logged since the last `start` (server.log is appended to
# across restarts, so only look past the offset recorded at start time).
started_in_log() {
  [[ -f "$SERVER_LOG" ]] || return 1
  local pos=0 size
  [[ -f "$START_MARK" ]] && pos="$(tr -dc '0-9' <"$START_MARK")"
  size="$(stat -c %s "$SERVER_LOG")"
  if [[ -z "$pos" || "$size" -lt "$pos" ]]; then pos=0; fi   # rotated
  # `|| true`: grep -q stops at the first match and tail then dies of SIGPIPE, which under
  # pipefail would make a found line look like a missing one once the log has grown past it.
  { tail -c +"$((pos + 1))" "$SERVER_LOG" || true; } |
    grep -qE 'Kafka Server started|\[KafkaRaftServer nodeId=[0-9]+\] Kafka Server started'
}

show_log_tail() {
  local n="${1:-60}"
  if [[ -s "$STDOUT_LOG" ]]; then
    echo "----- last lines of $STDOUT_LOG -----" >&2
    tail -n 20 "$STDOUT_LOG" >&2 || true
  fi
  if [[ -f "$SERVER_LOG" ]]; then
    local pos=0 size
    [[ -f "$START_MARK" ]] && pos="$(tr -dc '0-9' <"$START_MARK")"
    size="$(stat -c %s "$SERVER_LOG")"
    if [[ -z "$pos" || "$size" -lt "$pos" ]]; then pos=0; fi
    if ((size > pos)); then
      echo "----- last $n lines of $SERVER_LOG (this start) -----" >&2
      tail -c +"$((pos + 1))" "$SERVER_LOG" | tail -n "$n" >&2 || true
    else
      echo "----- $SERVER_LOG: nothing logged since this start -----" >&2
    fi
  fi
  echo "-----" >&2
}

# ---------------------------------------------------------------- install

cmd_install() {
  if is_installed; then
    log "Kafka $(kafka_version) already installed in $LIBS"
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found (needed to fetch the Kafka jars from Maven Central)"
  command -v "$(java_bin)" >/dev/null || die "java not found (Kafka 4.x needs Java 17+)"
  if is_running; then
    die "the broker is running with an older install; run '$0 stop' before reinstalling"
  fi
  local version tmp mvnlog
  version="$(kafka_version)"
  log "installing Kafka $version jars from Maven Central into $LIBS ..."
  mkdir -p "$KDIR"
  tmp="$KDIR/libs.tmp.$$"
  mvnlog="$KDIR/mvn-install.log"
  rm -rf "$tmp"
  if ! mvn -B -q -Dstyle.color=never -f "$POM" -Dkafka.version="$version" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$mvnlog" >&2 || true
    die "mvn dependency:copy-dependencies failed (full log: $mvnlog)"
  fi
  [[ -f "$tmp/kafka_2.13-$version.jar" ]] || { rm -rf "$tmp"; die "kafka_2.13-$version.jar missing after mvn"; }
  install_fingerprint >"$tmp/.nimbus-installed"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  log "installed $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1)) for Kafka $version"
}

# ---------------------------------------------------------------- config

write_config() {
  kafka_write_node_config conf_dir="$CONF_DIR" data_dir="$DATA_DIR" log_dir="$LOG_DIR" \
    node_id=1 voters="1@$HOST:$CONTROLLER_PORT" port="$PORT" controller_port="$CONTROLLER_PORT" \
    auto_create="$AUTO_CREATE" replication=1 min_isr=1 \
    note="small machine" io_threads=4 background_threads=4 segment_bytes=134217728 \
    server_log_mb=50 server_log_keep=3 controller_log=true
  write_tools_log4j
}

format_storage_if_needed() {
  [[ -f "$DATA_DIR/meta.properties" ]] && return 0
  local cid
  cid="$(kafka_cluster_id "$CLUSTER_ID_FILE")"
  log "formatting storage in $DATA_DIR (cluster id $cid)"
  run_tool kafka.tools.StorageTool format -t "$cid" -c "$SERVER_PROPS" --ignore-formatted >&2 \
    || die "kafka-storage format failed"
}

# ---------------------------------------------------------------- commands

# Ready = the JVM is alive, the client port accepts TCP connections and, when
# kafka-python is importable, a real metadata request (list_topics + describe_cluster)
# succeeds. Without kafka-python: "Kafka Server started" in this run's server.log.
# If the log says started but the kafka-python check keeps failing for 15 s (e.g. an
# incompatible kafka-python), the log wins and the python error is shown as a warning.
cmd_wait() {
  local timeout="${1:-$START_TIMEOUT}"
  local deadline=$((SECONDS + timeout)) use_py=0 log_ok_since=""
  have_kafka_python && use_py=1
  while :; do
    if ! is_running; then
      show_log_tail
      die "Kafka broker is not running (it exited or was never started); see $LOG_DIR"
    fi
    if port_open "$PORT"; then
      if [[ $use_py == 1 ]]; then
        if metadata_ok; then break; fi
        if started_in_log; then
          [[ -n "$log_ok_since" ]] || log_ok_since=$SECONDS
          if ((SECONDS - log_ok_since >= 15)); then
            log "WARNING: broker logged 'Kafka Server started' but the kafka-python metadata check fails:"
            tail -n 5 "$KDIR/wait-check.err" >&2 || true
            use_py=0
            break
          fi
        fi
      elif started_in_log; then
        break
      fi
    fi
    if ((SECONDS >= deadline)); then
      show_log_tail
      die "Kafka broker on $BOOTSTRAP did not become ready within ${timeout}s; the JVM (pid $(broker_pid)) is left running: '$0 wait' to keep waiting, '$0 stop' to stop it. Logs in $LOG_DIR"
    fi
    sleep 0.5
  done
  log "Kafka broker ready on $BOOTSTRAP (pid $(broker_pid)$([[ $use_py == 1 ]] && echo ', metadata request OK'))"
}

cmd_start() {
  if is_running; then
    log "already running (pid $(broker_pid))"
    cmd_wait
    return 0
  fi
  cmd_install
  if port_open "$PORT"; then
    die "port $PORT is already in use by another process (set NIMBUS_KAFKA_PORT)"
  fi
  if port_open "$CONTROLLER_PORT"; then
    die "controller port $CONTROLLER_PORT is already in use by another process (set NIMBUS_KAFKA_CONTROLLER_PORT)"
  fi
  rm -f "$PID_FILE"
  write_config
  format_storage_if_needed

  echo "$PORT $CONTROLLER_PORT" >"$PORT_FILE"
  if [[ -f "$SERVER_LOG" ]]; then stat -c %s "$SERVER_LOG" >"$START_MARK"; else echo 0 >"$START_MARK"; fi
  log "starting Kafka $(kafka_version) on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, data $DATA_DIR)"
  kafka_launch_jvm "$CONF_DIR" "$LOG_DIR" "$PID_FILE"
  sleep 0.3
  cmd_wait
}

cmd_stop() { stop_server TERM broker "$PID_FILE" "$(broker_pid)"; }

cmd_status() {
  local pid
  pid="$(broker_pid)"
  if [[ -n "$pid" ]]; then
    local ready="not answering"
    port_open "$PORT" && ready="accepting connections"
    echo "kafka: running (pid $pid, $BOOTSTRAP, $ready, version $(kafka_version))"
    return 0
  fi
  if is_installed; then
    echo "kafka: stopped (installed: Kafka $(kafka_version) in $LIBS)"
  else
    echo "kafka: stopped (not installed)"
  fi
  return 3
}

require_installed() {
  is_installed || die "Kafka is not installed; run '$0 install' (or start) first"
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  lock_if_changing "$cmd"
  use_running_ports broker NIMBUS_KAFKA_PORT
  BOOTSTRAP="$HOST:$PORT"
  case "$cmd" in
    install) cmd_install ;;
    start) cmd_start ;;
    wait) cmd_wait "$@" ;;
    stop) cmd_stop ;;
    restart)
      cmd_stop
      PORT="${NIMBUS_KAFKA_PORT:-19092}"; CONTROLLER_PORT="${NIMBUS_KAFKA_CONTROLLER_PORT:-19093}"
      BOOTSTRAP="$HOST:$PORT"
      cmd_start
      ;;
    kill9|kill-9) stop_server KILL broker "$PID_FILE" "$(broker_pid)" ;;
    status) cmd_status ;;
    env) echo "NIMBUS_KAFKA_BROKERS=$BOOTSTRAP" ;;
    logs) tail -n "${1:-100}" "$SERVER_LOG" ;;
    reset)
      cmd_stop
      rm -rf "$DATA_DIR" "$CONF_DIR" "$LOG_DIR" "$CLUSTER_ID_FILE" "$START_MARK"
      log "data, config and logs removed (jars kept in $LIBS)"
      ;;
    perf-produce) require_installed; run_tool_at "$BOOTSTRAP" org.apache.kafka.tools.ProducerPerformance "$@" ;;
    perf-consume) require_installed; run_tool_at "$BOOTSTRAP" org.apache.kafka.tools.ConsumerPerformance "$@" ;;
    topics) require_installed; run_tool_at "$BOOTSTRAP" org.apache.kafka.tools.TopicCommand "$@" ;;
    run-class)
      require_installed
      [[ $# -ge 1 ]] || die "usage: $0 run-class <main class> [args]"
      run_tool "$@"
      ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
