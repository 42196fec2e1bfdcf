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
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
POM="$SCRIPT_DIR/kafka/pom.xml"

LOCAL_DIR="${NIMBUS_LOCAL_DIR:-$ROOT/.local}"
KDIR="$LOCAL_DIR/kafka"
LIBS="$KDIR/libs"
CONF_DIR="$KDIR/config"
DATA_DIR="$KDIR/data"
LOG_DIR="$KDIR/logs"
PID_FILE="$KDIR/kafka.pid"
CLUSTER_ID_FILE="$KDIR/cluster.id"
SERVER_PROPS="$CONF_DIR/server.properties"
LOG4J_SERVER="$CONF_DIR/log4j2.xml"
LOG4J_TOOLS="$CONF_DIR/tools-log4j2.xml"
SERVER_LOG="$LOG_DIR/server.log"
STDOUT_LOG="$LOG_DIR/kafka.out"
START_MARK="$KDIR/start.logpos"
STAMP="$LIBS/.nimbus-installed"
PORT_FILE="$KDIR/kafka.port"

HOST=127.0.0.1
PORT="${NIMBUS_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${NIMBUS_KAFKA_CONTROLLER_PORT:-19093}"
HEAP_OPTS="${NIMBUS_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
AUTO_CREATE="${NIMBUS_KAFKA_AUTO_CREATE_TOPICS:-true}"
START_TIMEOUT="${NIMBUS_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${NIMBUS_KAFKA_STOP_TIMEOUT:-30}"
BOOTSTRAP="$HOST:$PORT"
# The metadata check's Python: the project's venv (it has kafka-python) unless told otherwise.
if [[ -z "${NIMBUS_KAFKA_PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
else
  PYTHON="${NIMBUS_KAFKA_PYTHON:-python3}"
fi

LOG_TAG=kafka
LOCK_DIR="$KDIR"
# shellcheck source=scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"

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
broker_pid() {
  [[ -f "$PID_FILE" ]] || return 0
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  if [[ "$cmdline" == *kafka.Kafka* && "$cmdline" == *"$SERVER_PROPS"* ]]; then
    echo "$pid"
  fi
}

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

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"; else echo java; fi
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
  mkdir -p "$CONF_DIR" "$DATA_DIR" "$LOG_DIR"
  cat >"$SERVER_PROPS" <<EOF
# Generated by scripts/kafka.sh -- edits are overwritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$DATA_DIR

num.partitions=8
auto.create.topics.enable=$AUTO_CREATE
delete.topic.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

# After a kill -9 the restarted broker cannot re-register (DUPLICATE_BROKER_REGISTRATION)
# until the controller expires the old session (default 9 s); shorten that window.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000

# small machine
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.retention.hours=24
log.segment.bytes=134217728
log.retention.check.interval.ms=300000
EOF

  cat >"$LOG4J_SERVER" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka.sh. Kafka 4.x logs via slf4j -> log4j2 (log4j 1.x is gone). -->
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="server" fileName="$LOG_DIR/server.log"
                 filePattern="$LOG_DIR/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
    <RollingFile name="controller" fileName="$LOG_DIR/controller.log"
                 filePattern="$LOG_DIR/controller.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.controller" level="INFO" additivity="false"><AppenderRef ref="controller"/></Logger>
    <Logger name="org.apache.kafka.controller" level="INFO" additivity="false"><AppenderRef ref="controller"/></Logger>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log.LogCleaner" level="WARN"/>
  </Loggers>
</Configuration>
EOF

  write_tools_log4j
}

write_tools_log4j() {
  mkdir -p "$CONF_DIR"
  cat >"$LOG4J_TOOLS" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka.sh: command line tools log warnings to stderr. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers><Root level="WARN"><AppenderRef ref="stderr"/></Root></Loggers>
</Configuration>
EOF
}

# Run a Kafka class with the tools logging config.
run_tool() {
  local cls="$1"; shift
  [[ -f "$LOG4J_TOOLS" ]] || write_tools_log4j
  "$(java_bin)" -Xmx512m -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_TOOLS" \
    -cp "$LIBS/*" "$cls" "$@"
}

format_storage_if_needed() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    return 0
  fi
  local cid
  if [[ -s "$CLUSTER_ID_FILE" ]]; then
    cid="$(tr -d '[:space:]' <"$CLUSTER_ID_FILE")"
  else
    cid="$(run_tool kafka.tools.StorageTool random-uuid | tail -n1 | tr -d '[:space:]')"
    [[ -n "$cid" ]] || die "kafka-storage random-uuid returned nothing"
    echo "$cid" >"$CLUSTER_ID_FILE"
  fi
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
  : >"$STDOUT_LOG"
  log "starting Kafka $(kafka_version) on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, data $DATA_DIR)"
  # setsid: own session, so Ctrl-C / process-group kills of the caller do not hit the
  # broker. The inner bash writes its own pid and execs java, so the pid file holds
  # the JVM's pid.
  # shellcheck disable=SC2086,SC2016
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
    "$(java_bin)" $HEAP_OPTS \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    -Dkafka.logs.dir="$LOG_DIR" \
    -Dlog4j2.configurationFile="$LOG4J_SERVER" \
    -cp "$LIBS/*" kafka.Kafka "$SERVER_PROPS" \
    >"$STDOUT_LOG" 2>&1 </dev/null 9>&- &
  # wait (briefly) for the pid file written by the child
  local _
  for _ in $(seq 1 50); do
    [[ -s "$PID_FILE" ]] && break
    sleep 0.1
  done
  sleep 0.3
  cmd_wait
}

cmd_stop() {
  local pid
  pid="$(broker_pid)"
  if [[ -z "$pid" ]]; then
    log "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  log "stopping broker (pid $pid, SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_kill9() {
  local pid
  pid="$(broker_pid)"
  if [[ -z "$pid" ]]; then
    log "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  log "SIGKILL broker (pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$PID_FILE"
}

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

# Append a bootstrap option unless the caller already provided one.
mentions_bootstrap() {
  local a
  for a in "$@"; do
    case "$a" in
      --bootstrap-server|--bootstrap-server=*|*bootstrap.servers*|--broker-list|--producer.config|--consumer.config|--command-config) return 0 ;;
    esac
  done
  return 1
}

require_installed() {
  is_installed || die "Kafka is not installed; run '$0 install' (or start) first"
}

cmd_perf_produce() {
  require_installed
  if mentions_bootstrap "$@"; then
    run_tool org.apache.kafka.tools.ProducerPerformance "$@"
  else
    run_tool org.apache.kafka.tools.ProducerPerformance "$@" --bootstrap-server "$BOOTSTRAP"
  fi
}

cmd_perf_consume() {
  require_installed
  if mentions_bootstrap "$@"; then
    run_tool org.apache.kafka.tools.ConsumerPerformance "$@"
  else
    run_tool org.apache.kafka.tools.ConsumerPerformance "$@" --bootstrap-server "$BOOTSTRAP"
  fi
}

cmd_topics() {
  require_installed
  if mentions_bootstrap "$@"; then
    run_tool org.apache.kafka.tools.TopicCommand "$@"
  else
    run_tool org.apache.kafka.tools.TopicCommand "$@" --bootstrap-server "$BOOTSTRAP"
  fi
}

# While a broker runs, its recorded ports win over the environment, so status/env/wait/
# perf-* talk to the broker that is actually running.
use_running_ports() {
  is_running || return 0
  [[ -s "$PORT_FILE" ]] || return 0
  local p c
  read -r p c <"$PORT_FILE" || true
  [[ -n "$p" ]] || return 0
  if [[ "$p" != "$PORT" && -n "${NIMBUS_KAFKA_PORT:-}" ]]; then
    log "note: the running broker listens on $p, not NIMBUS_KAFKA_PORT=$NIMBUS_KAFKA_PORT"
  fi
  PORT="$p"
  CONTROLLER_PORT="${c:-$CONTROLLER_PORT}"
  BOOTSTRAP="$HOST:$PORT"
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    install|start|stop|kill9|kill-9|restart|reset) take_lock ;;
  esac
  use_running_ports
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
    kill9|kill-9) cmd_kill9 ;;
    status) cmd_status ;;
    env) echo "NIMBUS_KAFKA_BROKERS=$BOOTSTRAP" ;;
    logs) tail -n "${1:-100}" "$SERVER_LOG" ;;
    reset)
      cmd_stop
      rm -rf "$DATA_DIR" "$CONF_DIR" "$LOG_DIR" "$CLUSTER_ID_FILE" "$START_MARK"
      log "data, config and logs removed (jars kept in $LIBS)"
      ;;
    perf-produce) cmd_perf_produce "$@" ;;
    perf-consume) cmd_perf_consume "$@" ;;
    topics) cmd_topics "$@" ;;
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
