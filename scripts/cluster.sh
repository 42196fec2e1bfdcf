#!/usr/bin/env bash
# Local clusters for Nimbus (issue 17, no Docker): 3 Apache Kafka 4.x KRaft nodes (each a
# combined broker+controller; 3 controller voters) and a Redis Cluster of 3 masters +
# 3 replicas, all on 127.0.0.1, from the same Maven jars (scripts/kafka.sh install) and
# Debian redis-server as the single-node run (scripts/services.sh).
#
# Usage: scripts/cluster.sh <command> [args]
#   up                 start everything (format Kafka storage / create the Redis Cluster on
#                      first use; later starts keep the data and nodes.conf), wait until
#                      ready, print the env lines
#   down               stop everything (SIGTERM, then SIGKILL after a timeout)
#   status             one line per process; exit 0 all running, 3 all stopped, 1 partial
#   env                print the env lines, e.g. `eval "$(scripts/cluster.sh env)"`
#   reset              down, then delete all cluster state (the Kafka jars are kept)
#   logs kafka-N|PORT [L]  tail the last L (default 100) lines of a node's log
# Chaos helpers (what a harness needs to kill a partition leader and a Redis master):
#   kafka-kill9 N      SIGKILL Kafka node N (1..3)
#   kafka-start N      start Kafka node N, wait until the cluster reports it again
#   kafka-launch N     start Kafka node N and return at once: the caller watches for it (the
#                      lock that serialises these commands is not held while the JVM starts)
#   kafka-leader TOPIC PARTITION
#                      print the node id leading that partition (-1: no leader)
#   redis-kill9 PORT   SIGKILL the Redis node on PORT
#   redis-start PORT   start that node (it rejoins, as a replica if it was failed over)
#                      and wait until the cluster is ok again
#   redis-masters      the ports of the masters currently serving slots, one a line
#
# Ready means: every Kafka node answers a metadata request and the cluster reports 3
# unfenced brokers (kafka-python from .venv); every Redis node's CLUSTER INFO says
# cluster_state:ok with all 16384 slots ok and 6 known nodes.
#
# `env` prints
#   export NIMBUS_KAFKA_BROKERS=127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094
#   export NIMBUS_REDIS_MODE=cluster NIMBUS_REDIS_ADDRESS=127.0.0.1:27001,...,127.0.0.1:27006
# Nimbus runs on both: NIMBUS_REDIS_MODE=cluster selects its Redis Cluster state store
# (nimbus/engines/redis_cluster.py), with the seed nodes in NIMBUS_REDIS_ADDRESS.
#
# Kafka settings (what an operator picks for 3 brokers): default.replication.factor=3,
# min.insync.replicas=2, offsets/transaction/share-state topics RF 3 with min ISR 2,
# unclean.leader.election.enable=false, auto.create.topics.enable=false (Nimbus creates
# its topics; they get RF 3 from the default), num.partitions=8, short broker session
# (4 s) so a killed broker is fenced and its partitions move quickly.
# Redis settings: cluster-enabled, appendonly yes (everysec), cluster-node-timeout 5000 ms,
# cluster-require-full-coverage no (the other masters keep serving while one's slots fail
# over). Replication is asynchronous: a write acknowledged just before a master is killed
# can be lost unless the writer used WAIT.
#
# Environment:
#   NIMBUS_CLUSTER_KAFKA_PORT        first client port, default 29092 (nodes use +0,+1,+2)
#   NIMBUS_CLUSTER_CONTROLLER_PORT   first controller port, default 29192 (+0,+1,+2)
#   NIMBUS_CLUSTER_REDIS_PORT        first Redis port, default 27001 (+0..+5)
#   NIMBUS_CLUSTER_KAFKA_HEAP_OPTS   default "-Xms128m -Xmx384m" per broker
#   NIMBUS_CLUSTER_KAFKA_LIBS        Kafka jars, default <local>/kafka/libs (installed by
#                                    scripts/kafka.sh install when missing there)
#   NIMBUS_CLUSTER_AUTO_CREATE_TOPICS  true|false, default false
#   NIMBUS_CLUSTER_REDIS_NODE_TIMEOUT  cluster-node-timeout in ms, default 5000
#   NIMBUS_CLUSTER_START_TIMEOUT     seconds to wait for readiness, default 120
#   NIMBUS_CLUSTER_STOP_TIMEOUT      seconds between SIGTERM and SIGKILL, default 30
#   NIMBUS_KAFKA_PYTHON              python for the metadata checks, default .venv/bin/python
#   NIMBUS_LOCAL_DIR                 state root, default <repo>/.local; the cluster lives in
#                                    <local>/cluster (kafka-N/, redis-PORT/)
# The ports are fixed when the cluster's state is first created (a Redis Cluster's
# nodes.conf records them); to change them, `reset` first.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=cluster
# shellcheck source=scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"  # sets ROOT and LOCAL_DIR
# shellcheck source=scripts/kafka_lib.sh
source "$SCRIPT_DIR/kafka_lib.sh"
# shellcheck source=scripts/redis_lib.sh
source "$SCRIPT_DIR/redis_lib.sh"

CDIR="$LOCAL_DIR/cluster"
LIBS="${NIMBUS_CLUSTER_KAFKA_LIBS:-$LOCAL_DIR/kafka/libs}"
PORTS_FILE="$CDIR/ports"
CLUSTER_ID_FILE="$CDIR/kafka.cluster.id"
REDIS_CREATED="$CDIR/redis.created"
TOOLS_LOG4J="$CDIR/tools-log4j2.xml"
TOOL_HEAP=-Xmx256m
META_PY="$SCRIPT_DIR/cluster/kafka_meta.py"

HOST=127.0.0.1
KAFKA_NODES=(1 2 3)
KAFKA_PORT="${NIMBUS_CLUSTER_KAFKA_PORT:-29092}"
CONTROLLER_PORT="${NIMBUS_CLUSTER_CONTROLLER_PORT:-29192}"
REDIS_PORT="${NIMBUS_CLUSTER_REDIS_PORT:-27001}"
HEAP_OPTS="${NIMBUS_CLUSTER_KAFKA_HEAP_OPTS:--Xms128m -Xmx384m}"
AUTO_CREATE="${NIMBUS_CLUSTER_AUTO_CREATE_TOPICS:-false}"
NODE_TIMEOUT="${NIMBUS_CLUSTER_REDIS_NODE_TIMEOUT:-5000}"
START_TIMEOUT="${NIMBUS_CLUSTER_START_TIMEOUT:-120}"
STOP_TIMEOUT="${NIMBUS_CLUSTER_STOP_TIMEOUT:-30}"

LOCK_DIR="$CDIR"

# ---------------------------------------------------------------- ports

# Once state exists its ports win; a different NIMBUS_CLUSTER_* port is an error, not a
# silent switch (the Redis nodes.conf files name the old ports).
load_ports() {
  [[ -s "$PORTS_FILE" ]] || return 0
  local k c r
  read -r k c r <"$PORTS_FILE" || true
  [[ -n "$k" && -n "$c" && -n "$r" ]] || return 0
  if [[ -n "${NIMBUS_CLUSTER_KAFKA_PORT:-}" && "$NIMBUS_CLUSTER_KAFKA_PORT" != "$k" ]] ||
     [[ -n "${NIMBUS_CLUSTER_CONTROLLER_PORT:-}" && "$NIMBUS_CLUSTER_CONTROLLER_PORT" != "$c" ]] ||
     [[ -n "${NIMBUS_CLUSTER_REDIS_PORT:-}" && "$NIMBUS_CLUSTER_REDIS_PORT" != "$r" ]]; then
    die "the cluster state in $CDIR uses ports kafka $k, controller $c, redis $r; unset NIMBUS_CLUSTER_*_PORT or run '$0 reset' first"
  fi
  KAFKA_PORT="$k" CONTROLLER_PORT="$c" REDIS_PORT="$r"
}

kport() { echo $((KAFKA_PORT + $1 - 1)); }
cport() { echo $((CONTROLLER_PORT + $1 - 1)); }
redis_ports() { local i; for i in 0 1 2 3 4 5; do echo $((REDIS_PORT + i)); done; }

kafka_brokers() {
  local n out=()
  for n in "${KAFKA_NODES[@]}"; do out+=("$HOST:$(kport "$n")"); done
  (IFS=,; echo "${out[*]}")
}

redis_addresses() {
  local p out=()
  for p in $(redis_ports); do out+=("$HOST:$p"); done
  (IFS=,; echo "${out[*]}")
}

print_env() {
  echo "export NIMBUS_KAFKA_BROKERS=$(kafka_brokers)"
  echo "export NIMBUS_REDIS_MODE=cluster NIMBUS_REDIS_ADDRESS=$(redis_addresses)"
}

check_node_id() {
  [[ "${1:-}" =~ ^[123]$ ]] || die "Kafka node id must be 1, 2 or 3 (got '${1:-}')"
}

check_redis_port() {
  local p
  for p in $(redis_ports); do [[ "$p" == "${1:-}" ]] && return 0; done
  die "not a cluster Redis port: '${1:-}' (the nodes are $(redis_ports | tr '\n' ' '))"
}

# ---------------------------------------------------------------- Kafka

kdir() { echo "$CDIR/kafka-$1"; }
kprops() { echo "$(kdir "$1")/config/server.properties"; }
kpidfile() { echo "$(kdir "$1")/kafka.pid"; }
kafka_pid() { pid_if_ours "$(kpidfile "$1")" kafka.Kafka "$(kprops "$1")"; }

kafka_running_nodes() {
  local n
  for n in "${KAFKA_NODES[@]}"; do [[ -n "$(kafka_pid "$n")" ]] && echo "$n"; done
  return 0
}

ensure_kafka_installed() {
  if ! compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null; then
    if [[ -n "${NIMBUS_CLUSTER_KAFKA_LIBS:-}" ]]; then
      die "no Kafka jars in NIMBUS_CLUSTER_KAFKA_LIBS=$LIBS"
    fi
    log "no Kafka jars in $LIBS; installing them with scripts/kafka.sh install"
    NIMBUS_LOCAL_DIR="$LOCAL_DIR" bash "$SCRIPT_DIR/kafka.sh" install
  fi
}

kafka_write_config() {
  local n="$1" d voters="" m
  d="$(kdir "$n")"
  for m in "${KAFKA_NODES[@]}"; do voters+="${voters:+,}$m@$HOST:$(cport "$m")"; done
  kafka_write_node_config conf_dir="$d/config" data_dir="$d/data" log_dir="$d/logs" \
    node_id="$n" voters="$voters" port="$(kport "$n")" controller_port="$(cport "$n")" \
    auto_create="$AUTO_CREATE" replication=3 min_isr=2 \
    note="small machine, three JVMs" io_threads=2 background_threads=2 replica_fetchers=1 \
    segment_bytes=67108864 server_log_mb=20 server_log_keep=2 controller_log=false
}

kafka_format_if_needed() {
  local n="$1" d cid
  d="$(kdir "$n")"
  [[ -f "$d/data/meta.properties" ]] && return 0
  cid="$(kafka_cluster_id "$CLUSTER_ID_FILE")"
  log "kafka-$n: formatting $d/data (cluster id $cid)"
  if ! run_tool kafka.tools.StorageTool format -t "$cid" -c "$(kprops "$n")" --ignore-formatted \
        >"$d/logs/format.log" 2>&1; then
    cat "$d/logs/format.log" >&2
    die "kafka-storage format failed for node $n"
  fi
}

# Start node N's JVM in the background (no wait for readiness; see kafka_launch_jvm).
kafka_launch() {
  local n="$1" d pidfile
  d="$(kdir "$n")"
  pidfile="$(kpidfile "$n")"
  if [[ -n "$(kafka_pid "$n")" ]]; then
    log "kafka-$n already running (pid $(kafka_pid "$n"))"
    return 0
  fi
  if port_open "$(kport "$n")"; then die "port $(kport "$n") (kafka-$n) is in use by another process"; fi
  if port_open "$(cport "$n")"; then die "port $(cport "$n") (kafka-$n controller) is in use by another process"; fi
  rm -f "$pidfile"
  kafka_write_config "$n"
  kafka_format_if_needed "$n"
  log "kafka-$n: starting on $HOST:$(kport "$n") (controller $HOST:$(cport "$n"))"
  kafka_launch_jvm "$d/config" "$d/logs" "$pidfile"
}

kafka_show_tail() {
  local n="$1" d
  d="$(kdir "$n")"
  if [[ -s "$d/logs/kafka.out" ]]; then
    echo "----- kafka-$n: last lines of kafka.out -----" >&2
    tail -n 15 "$d/logs/kafka.out" >&2 || true
  fi
  if [[ -f "$d/logs/server.log" ]]; then
    echo "----- kafka-$n: last lines of server.log -----" >&2
    tail -n 25 "$d/logs/server.log" >&2 || true
  fi
}

# Wait until every running node answers metadata and the cluster reports as many unfenced
# brokers as nodes are running. Nodes given as arguments must be running (else fail fast).
kafka_wait() {
  local must=("$@") deadline=$((SECONDS + START_TIMEOUT)) n nodes running why=""
  "$PYTHON" -c 'import kafka' 2>/dev/null \
    || die "kafka-python is not importable by $PYTHON (set NIMBUS_KAFKA_PYTHON or create .venv)"
  while :; do
    for n in "${must[@]}"; do
      if [[ -z "$(kafka_pid "$n")" ]]; then
        kafka_show_tail "$n"
        die "kafka-$n is not running (it exited or was never started)"
      fi
    done
    mapfile -t running < <(kafka_running_nodes)
    nodes=()
    for n in "${running[@]}"; do nodes+=("$HOST:$(kport "$n")"); done
    if ((${#nodes[@]} > 0)); then
      if why="$(timeout 30 "$PYTHON" "$META_PY" ready "${#nodes[@]}" "${nodes[@]}" 2>&1)"; then
        log "kafka ready: nodes ${running[*]} answer, cluster reports ${#nodes[@]} brokers"
        return 0
      fi
    fi
    if ((SECONDS >= deadline)); then
      for n in "${must[@]}"; do kafka_show_tail "$n"; done
      die "Kafka not ready within ${START_TIMEOUT}s: ${why:-no node running}"
    fi
    sleep 1
  done
}

# SIGTERM all nodes at once. Each broker's controlled shutdown needs a controller quorum
# (2 of the 3 voters), so the last node left cannot finish it (Kafka would wait 5 minutes):
# once a single node remains, it gets LAST_NODE_GRACE seconds, then SIGKILL. Nothing
# acknowledged is lost by that (acks=all records are on the other two nodes' logs too); its
# next start recovers its log segments.
LAST_NODE_GRACE=5
kafka_stop_all() {
  local n pids
  mapfile -t pids < <(for n in "${KAFKA_NODES[@]}"; do kafka_pid "$n"; done)
  ((${#pids[@]} > 0)) || return 0
  log "stopping Kafka nodes (pids ${pids[*]}, SIGTERM)"
  LAST_GRACE=$LAST_NODE_GRACE LAST_WHY="has no controller quorum for its controlled shutdown" \
    stop_pids TERM "${pids[@]}"
  for n in "${KAFKA_NODES[@]}"; do rm -f "$(kpidfile "$n")"; done
}

cmd_kafka_start() {
  check_node_id "${1:-}"
  [[ -s "$PORTS_FILE" ]] || die "no cluster state in $CDIR; run '$0 up' first"
  ensure_kafka_installed
  kafka_launch "$1"
  kafka_wait "$1"
}

cmd_kafka_launch() {
  check_node_id "${1:-}"
  [[ -s "$PORTS_FILE" ]] || die "no cluster state in $CDIR; run '$0 up' first"
  ensure_kafka_installed
  kafka_launch "$1"
}

cmd_kafka_leader() {
  [[ $# -eq 2 && "$2" =~ ^[0-9]+$ ]] || die "usage: $0 kafka-leader TOPIC PARTITION"
  local n nodes=()
  for n in $(kafka_running_nodes); do nodes+=("$HOST:$(kport "$n")"); done
  ((${#nodes[@]} > 0)) || die "no Kafka node is running"
  timeout 30 "$PYTHON" "$META_PY" leader "$1" "$2" "${nodes[@]}"
}

# ---------------------------------------------------------------- Redis

rdir() { echo "$CDIR/redis-$1"; }
rpidfile() { echo "$(rdir "$1")/redis.pid"; }
# redis-server sets its process title to "redis-server 127.0.0.1:PORT [cluster]"
redis_pid() { pid_if_ours "$(rpidfile "$1")" redis-server ":$1"; }

rcli() { local p="$1"; shift; timeout 5 redis-cli -h "$HOST" -p "$p" "$@"; }

redis_write_config() {
  local p="$1" d
  d="$(rdir "$p")"
  redis_write_conf conf="$d/redis.conf" port="$p" pidfile="$d/redis.pid" logfile="$d/redis.log" dir="$d" \
    maxmemory=128mb cluster_node_timeout="$NODE_TIMEOUT"
}

redis_launch() {
  local p="$1" d
  d="$(rdir "$p")"
  if [[ -n "$(redis_pid "$p")" ]]; then
    log "redis-$p already running (pid $(redis_pid "$p"))"
    return 0
  fi
  if port_open "$p"; then die "port $p is in use by another process"; fi
  if port_open $((p + 10000)); then die "cluster bus port $((p + 10000)) is in use by another process"; fi
  rm -f "$(rpidfile "$p")"
  redis_write_config "$p"
  if ! redis-server "$d/redis.conf" >>"$d/redis.log" 2>&1 </dev/null 9>&-; then
    tail -n 20 "$d/redis.log" >&2 || true
    die "redis-server on $p failed to start"
  fi
  wait_for_file "$(rpidfile "$p")"
}

redis_pong() { [[ "$(rcli "$1" ping 2>/dev/null)" == PONG ]]; }

# "" when the node sees a healthy cluster, else the reason
redis_cluster_why() {
  local info want
  info="$(rcli "$1" cluster info 2>/dev/null | tr -d '\r')" || { echo "no answer"; return 0; }
  for want in cluster_state:ok cluster_slots_ok:16384 cluster_known_nodes:6; do
    if ! grep -qx "$want" <<<"$info"; then
      grep "^${want%%:*}:" <<<"$info" || echo "no ${want%%:*}"
      return 0
    fi
  done
}

# Wait for PONG from the given ports; with "cluster" first, also for a healthy cluster view.
redis_wait() {
  local mode="$1"; shift
  local deadline=$((SECONDS + START_TIMEOUT)) p why
  while :; do
    why=""
    for p in "$@"; do
      if [[ -z "$(redis_pid "$p")" ]]; then
        tail -n 20 "$(rdir "$p")/redis.log" >&2 2>/dev/null || true
        die "redis-$p is not running (it exited or was never started)"
      fi
      if ! redis_pong "$p"; then why="redis-$p: no PONG"; break; fi
      if [[ "$mode" == cluster ]]; then
        why="$(redis_cluster_why "$p")"
        if [[ -n "$why" ]]; then why="redis-$p: $why"; break; fi
      fi
    done
    if [[ -z "$why" ]]; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      die "Redis not ready within ${START_TIMEOUT}s ($why)"
    fi
    sleep 0.3
  done
}

redis_create_cluster() {
  local p addrs=()
  for p in $(redis_ports); do addrs+=("$HOST:$p"); done
  log "creating the Redis Cluster (3 masters + 3 replicas) on ${addrs[*]}"
  if ! redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$CDIR/redis-create.log" 2>&1; then
    tail -n 30 "$CDIR/redis-create.log" >&2 || true
    die "redis-cli --cluster create failed (log: $CDIR/redis-create.log); '$0 reset' starts over"
  fi
  date -u +%FT%TZ >"$REDIS_CREATED"
}

redis_up() {
  command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server, or scripts/redis.sh install)"
  local p ports
  mapfile -t ports < <(redis_ports)
  if [[ ! -f "$REDIS_CREATED" ]]; then
    # a half-made cluster from an interrupted `up`: start these nodes afresh
    for p in "${ports[@]}"; do
      [[ -z "$(redis_pid "$p")" ]] || die "redis-$p runs but the cluster was never created; run '$0 reset'"
      rm -rf "$(rdir "$p")"
    done
  fi
  for p in "${ports[@]}"; do redis_launch "$p"; done
  if [[ ! -f "$REDIS_CREATED" ]]; then
    redis_wait ping "${ports[@]}"
    redis_create_cluster
  fi
  redis_wait cluster "${ports[@]}"
  log "redis cluster ok on ${ports[*]} (masters: $(redis_masters | tr '\n' ' '))"
}

redis_stop_all() {
  local sig="$1" p pids
  mapfile -t pids < <(for p in $(redis_ports); do redis_pid "$p"; done)
  ((${#pids[@]} > 0)) || return 0
  log "stopping Redis nodes (pids ${pids[*]}, SIG$sig)"
  stop_pids "$sig" "${pids[@]}"
  for p in $(redis_ports); do rm -f "$(rpidfile "$p")"; done
}

# Masters serving slots, as seen by the first running node that answers.
redis_masters() {
  local p out
  for p in $(redis_ports); do
    [[ -n "$(redis_pid "$p")" ]] || continue
    out="$(rcli "$p" cluster nodes 2>/dev/null | tr -d '\r')" || continue
    [[ -n "$out" ]] || continue
    # fields: id addr flags master ping pong epoch link slot...; addr is ip:port@bus[,host]
    awk '$3 ~ /master/ && $3 !~ /fail/ && NF >= 9 { split($2, a, "[:@]"); print a[2] }' <<<"$out" | sort -n
    return 0
  done
  die "no Redis node is running and answering"
}

cmd_redis_start() {
  check_redis_port "${1:-}"
  [[ -f "$REDIS_CREATED" ]] || die "the Redis Cluster was never created; run '$0 up' first"
  redis_launch "$1"
  redis_wait cluster "$1"
  log "redis-$1 up ($(rcli "$1" role 2>/dev/null | head -n1 | tr -d '\r'))"
}

# ---------------------------------------------------------------- commands

# cmd_kill9 kafka N | redis PORT: SIGKILL that node.
cmd_kill9() {
  local kind="$1" id="${2:-}" pidfile pid
  if [[ "$kind" == kafka ]]; then
    check_node_id "$id"
    pidfile="$(kpidfile "$id")" pid="$(kafka_pid "$id")"
  else
    check_redis_port "$id"
    pidfile="$(rpidfile "$id")" pid="$(redis_pid "$id")"
  fi
  stop_server KILL "$kind-$id" "$pidfile" "$pid" "$kind-$id not running"
}

cmd_up() {
  mkdir -p "$CDIR"
  echo "$KAFKA_PORT $CONTROLLER_PORT $REDIS_PORT" >"$PORTS_FILE"
  ensure_kafka_installed
  redis_up
  local n
  for n in "${KAFKA_NODES[@]}"; do kafka_launch "$n"; done
  # Once more if the quorum did not form: a JVM here once stalled 5 minutes in its start, and
  # the other two brokers gave up registering after 60 s (CI, 2026-12-06).
  if ! (kafka_wait "${KAFKA_NODES[@]}"); then
    log "Kafka did not come up; stopping every node and starting them once more"
    kafka_stop_all TERM
    for n in "${KAFKA_NODES[@]}"; do kafka_launch "$n"; done
    kafka_wait "${KAFKA_NODES[@]}"
  fi
  echo "# the clusters are up; point Nimbus at them with:" >&2
  print_env
}

cmd_down() {
  kafka_stop_all TERM
  redis_stop_all TERM
  log "down"
}

cmd_status() {
  local n p pid up=0 total=0 role
  for n in "${KAFKA_NODES[@]}"; do
    total=$((total + 1))
    pid="$(kafka_pid "$n")"
    if [[ -n "$pid" ]]; then
      up=$((up + 1))
      echo "kafka-$n: running (pid $pid, $HOST:$(kport "$n"), controller $HOST:$(cport "$n"))"
    else
      echo "kafka-$n: stopped ($HOST:$(kport "$n"))"
    fi
  done
  for p in $(redis_ports); do
    total=$((total + 1))
    pid="$(redis_pid "$p")"
    if [[ -n "$pid" ]]; then
      up=$((up + 1))
      role="$(rcli "$p" role 2>/dev/null | head -n1 | tr -d '\r' || true)"
      echo "redis-$p: running (pid $pid, ${role:-not answering})"
    else
      echo "redis-$p: stopped"
    fi
  done
  ((up == total)) && return 0
  ((up == 0)) && return 3
  return 1
}

cmd_logs() {
  local what="${1:-}" lines="${2:-100}"
  case "$what" in
    kafka-[123]) tail -n "$lines" "$(kdir "${what#kafka-}")/logs/server.log" ;;
    [0-9]*) check_redis_port "$what"; tail -n "$lines" "$(rdir "$what")/redis.log" ;;
    *) die "usage: $0 logs kafka-N|REDIS_PORT [lines]" ;;
  esac
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    up|down|reset|kafka-kill9|kafka-start|kafka-launch|redis-kill9|redis-start) take_lock ;;
  esac
  load_ports
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    reset)
      cmd_down
      rm -rf "$CDIR"
      log "cluster state removed ($CDIR; the Kafka jars in $LIBS are kept)"
      ;;
    logs) cmd_logs "$@" ;;
    kafka-kill9) cmd_kill9 kafka "$@" ;;
    kafka-start) cmd_kafka_start "$@" ;;
    kafka-launch) cmd_kafka_launch "$@" ;;
    kafka-leader) cmd_kafka_leader "$@" ;;
    redis-kill9) cmd_kill9 redis "$@" ;;
    redis-start) cmd_redis_start "$@" ;;
    redis-masters) redis_masters ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
