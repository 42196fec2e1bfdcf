#!/usr/bin/env bash
# Local redis-server for Nimbus development and tests (no Docker).
#
# Usage: scripts/redis.sh <command>
#   install   apt-get install redis-server if redis-server is missing
#   start     install if needed, start daemonized on 127.0.0.1:<port>, wait for PONG
#             (no-op + wait when already running)
#   wait      wait until PING answers PONG
#   status    print state; exit 0 when running, 3 when stopped
#   stop      SIGTERM (redis flushes the AOF and exits), wait, then SIGKILL; no-op when stopped
#   kill9     SIGKILL redis-server (chaos tests); `start` afterwards reloads the AOF
#   restart   stop + start
#   env       print NIMBUS_REDIS_ADDRESS=127.0.0.1:<port>
#   cli ...   redis-cli -p <port> ...
#   reset     stop and delete data, config and logs
#
# Environment:
#   NIMBUS_REDIS_PORT           default 16379
#   NIMBUS_REDIS_START_TIMEOUT  seconds, default 30
#   NIMBUS_REDIS_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL, default 15
#   NIMBUS_LOCAL_DIR            state root, default <repo>/.local
#
# Persistence: appendonly yes + appendfsync everysec (RDB snapshots off). Redis write()s
# the AOF before it replies, so a kill -9 of redis-server loses no acknowledged write;
# only an OS crash / power loss can lose up to ~1 s. (appendfsync always would cover that
# too, at a large throughput cost; not needed for process-level chaos tests.)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=redis
# shellcheck source=scripts/lib.sh
source "$SCRIPT_DIR/lib.sh"  # sets ROOT and LOCAL_DIR
# shellcheck source=scripts/redis_lib.sh
source "$SCRIPT_DIR/redis_lib.sh"

RDIR="$LOCAL_DIR/redis"
DATA_DIR="$RDIR/data"
CONF="$RDIR/redis.conf"
PID_FILE="$RDIR/redis.pid"
LOG_FILE="$RDIR/redis.log"
PORT_FILE="$RDIR/redis.port"

HOST=127.0.0.1
PORT="${NIMBUS_REDIS_PORT:-16379}"
START_TIMEOUT="${NIMBUS_REDIS_START_TIMEOUT:-30}"
STOP_TIMEOUT="${NIMBUS_REDIS_STOP_TIMEOUT:-15}"

LOCK_DIR="$RDIR"

cmd_install() { apt_install redis-server redis-server; }

# pid of our redis-server if alive (process title is "redis-server 127.0.0.1:<port>";
# the port is not checked so `stop` works whatever NIMBUS_REDIS_PORT the caller has).
redis_pid() { pid_if_ours "$PID_FILE" redis-server; }

is_running() { [[ -n "$(redis_pid)" ]]; }

# true when PING answers PONG (not e.g. "-LOADING" while the AOF is replayed)
ping_ok() {
  if command -v redis-cli >/dev/null 2>&1; then
    [[ "$(timeout 3 redis-cli -h "$HOST" -p "$PORT" ping 2>/dev/null)" == "PONG" ]]
  else
    (
      exec 3<>"/dev/tcp/$HOST/$PORT" || exit 1
      printf 'PING\r\n' >&3
      IFS= read -r -t 3 line <&3 || exit 1
      [[ "$line" == "+PONG"* ]]
    ) 2>/dev/null
  fi
}

show_log_tail() {
  if [[ -f "$LOG_FILE" ]]; then
    echo "----- last 30 lines of $LOG_FILE -----" >&2
    tail -n 30 "$LOG_FILE" >&2 || true
    echo "-----" >&2
  fi
}

write_config() {
  redis_write_conf conf="$CONF" port="$PORT" pidfile="$PID_FILE" logfile="$LOG_FILE" dir="$DATA_DIR" \
    maxmemory=256mb
}

cmd_wait() {
  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ping_ok; then
      break
    fi
    if ! is_running; then
      show_log_tail
      die "redis-server is not running on $HOST:$PORT (it exited or was never started)"
    fi
    if ((SECONDS >= deadline)); then
      show_log_tail
      die "redis-server on $HOST:$PORT did not answer PING within ${START_TIMEOUT}s (pid $(redis_pid))"
    fi
    sleep 0.2
  done
  log "redis ready on $HOST:$PORT (pid $(redis_pid))"
}

cmd_start() {
  if is_running; then
    log "already running (pid $(redis_pid))"
    cmd_wait
    return 0
  fi
  cmd_install
  if port_open "$PORT"; then
    die "port $PORT is already in use by another process (set NIMBUS_REDIS_PORT)"
  fi
  rm -f "$PID_FILE"
  write_config
  echo "$PORT" >"$PORT_FILE"
  log "starting redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') on $HOST:$PORT (data $DATA_DIR)"
  if ! redis-server "$CONF" >>"$LOG_FILE" 2>&1 </dev/null 9>&-; then
    show_log_tail
    die "redis-server failed to start"
  fi
  # daemonize: the pid file appears shortly after the parent returns
  wait_for_file "$PID_FILE"
  cmd_wait
}

stop_with() { stop_server "$1" redis-server "$PID_FILE" "$(redis_pid)"; }

cmd_status() {
  local pid
  pid="$(redis_pid)"
  if [[ -n "$pid" ]]; then
    local state="not answering PING"
    ping_ok && state="PONG"
    echo "redis: running (pid $pid, $HOST:$PORT, $state)"
    return 0
  fi
  echo "redis: stopped"
  return 3
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  lock_if_changing "$cmd"
  use_running_ports redis-server NIMBUS_REDIS_PORT
  case "$cmd" in
    install) cmd_install ;;
    start) cmd_start ;;
    wait) cmd_wait ;;
    stop) stop_with TERM ;;
    kill9|kill-9) stop_with KILL ;;
    restart) stop_with TERM; PORT="${NIMBUS_REDIS_PORT:-16379}"; cmd_start ;;
    status) cmd_status ;;
    env) echo "NIMBUS_REDIS_ADDRESS=$HOST:$PORT" ;;
    cli) exec redis-cli -h "$HOST" -p "$PORT" "$@" ;;
    reset)
      stop_with TERM
      rm -rf "$DATA_DIR" "$CONF" "$LOG_FILE"
      log "data, config and log removed"
      ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
