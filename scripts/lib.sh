# shellcheck shell=bash
# Helpers shared by the scripts that start servers (kafka.sh, redis.sh, cluster.sh) and by
# chromium.sh; sourced by them, not run on its own. Kafka's and Redis's own helpers are in
# kafka_lib.sh and redis_lib.sh.
# It sets ROOT (the repo) and LOCAL_DIR (the state root: NIMBUS_LOCAL_DIR, default
# <repo>/.local). The caller sets LOG_TAG (the prefix of its messages: kafka, redis) and, if
# it uses them, LOCK_DIR (take_lock: where its .lock lives), HOST (port_open), STOP_TIMEOUT
# (stop_pids: seconds between SIGTERM and SIGKILL), PORT_FILE and is_running
# (use_running_ports).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
LOCAL_DIR="${NIMBUS_LOCAL_DIR:-$ROOT/.local}"

log() { echo "[$LOG_TAG] $*" >&2; }
die() { echo "[$LOG_TAG] ERROR: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The comment block at the top of the script, from line 2 to `set -euo`.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Serialise state-changing commands (e.g. parallel test workers all calling `start`).
# fd 9 is closed for the server process so it does not inherit the lock.
take_lock() {
  # shellcheck disable=SC2153  # LOCK_DIR is the caller's
  mkdir -p "$LOCK_DIR"
  exec 9>"$LOCK_DIR/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 300 9 || die "timed out waiting for $LOCK_DIR/.lock (another $0 still running?)"
  fi
}

# take_lock when the command $1 is one that changes state (of kafka.sh and redis.sh)
lock_if_changing() {
  case "$1" in
    install|start|stop|kill9|kill-9|restart|reset) take_lock ;;
  esac
}

# apt_install PACKAGE CMD: install Debian's PACKAGE with apt-get unless CMD (a command name
# or an executable's path) is there already; sudo when not root.
apt_install() {
  local pkg="$1" cmd="$2" sudo=()
  command -v "$cmd" >/dev/null 2>&1 && return 0
  log "$cmd not found; installing Debian's $pkg package with apt-get"
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "$cmd missing and not root (no sudo); install the $pkg package"
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg"
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after apt-get install"
}

# ---------------------------------------------------------------- processes

# use_running_ports NAME PORT_ENV: while the server runs (is_running), the ports recorded in
# PORT_FILE at its start ("PORT [CONTROLLER_PORT]") win over the environment, so status/env/
# wait talk to the server that is actually running. Sets PORT (and CONTROLLER_PORT).
use_running_ports() {
  local name="$1" env="$2" p c
  is_running || return 0
  [[ -s "$PORT_FILE" ]] || return 0
  read -r p c <"$PORT_FILE" || true
  [[ -n "$p" ]] || return 0
  if [[ "$p" != "$PORT" && -n "${!env:-}" ]]; then
    log "note: the running $name listens on $p, not $env=${!env}"
  fi
  PORT="$p"
  # shellcheck disable=SC2034  # the caller's (kafka.sh)
  if [[ -n "$c" ]]; then CONTROLLER_PORT="$c"; fi
}

# pid from a pid file when that process is alive and its command line contains every
# given pattern (so a recycled pid of an unrelated process is never taken for ours).
pid_if_ours() {
  local file="$1"; shift
  [[ -f "$file" ]] || return 0
  local pid cmdline pat
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  for pat in "$@"; do [[ "$cmdline" == *"$pat"* ]] || return 0; done
  echo "$pid"
}

# Wait (up to 5 s) until FILE exists and is not empty, e.g. the pid file of a server just
# started in the background.
wait_for_file() {
  local _
  for _ in $(seq 1 50); do
    [[ -s "$1" ]] && return 0
    sleep 0.1
  done
}

# stop_pids TERM|KILL PID...: send the signal and wait until all of them are gone; a TERM
# not obeyed within STOP_TIMEOUT seconds becomes a SIGKILL. With LAST_GRACE set (e.g.
# `LAST_GRACE=5 LAST_WHY="..." stop_pids TERM ...`), the last one left of several gets
# LAST_GRACE seconds, then SIGKILL, logged with LAST_WHY.
stop_pids() {
  local sig="$1"; shift
  (($# > 0)) || return 0
  kill "-$sig" "$@" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT)) grace="${LAST_GRACE:-}" last_since="" pid alive
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && return 0
    if [[ "$sig" != KILL ]]; then
      if [[ -n "$grace" && -z "$last_since" ]] && ((${#alive[@]} == 1 && $# > 1)); then
        last_since=$SECONDS
      fi
      if [[ -n "$last_since" ]] && ((SECONDS - last_since >= grace)); then
        log "last node (pid ${alive[0]}) ${LAST_WHY:-outlived the others by ${grace}s}; SIGKILL"
        sig=KILL
      elif ((SECONDS >= deadline)); then
        if (($# == 1)); then
          log "still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
        else
          log "still alive after ${STOP_TIMEOUT}s: ${alive[*]}; sending SIGKILL"
        fi
        sig=KILL
      fi
      if [[ "$sig" == KILL ]]; then kill -KILL "${alive[@]}" 2>/dev/null || true; fi
    fi
    sleep 0.1
  done
}

# stop_server TERM|KILL NAME PID_FILE PID [NOT_RUNNING]: stop one server (see stop_pids)
# and remove its pid file; NAME is what the messages call it. With no PID it only logs
# NOT_RUNNING (default "not running").
stop_server() {
  local sig="$1" name="$2" file="$3" pid="$4"
  if [[ -z "$pid" ]]; then
    log "${5:-not running}"
    rm -f "$file"
    return 0
  fi
  if [[ "$sig" == KILL ]]; then
    log "SIGKILL $name (pid $pid)"
  else
    log "stopping $name (pid $pid, SIGTERM)"
  fi
  stop_pids "$sig" "$pid"
  rm -f "$file"
  [[ "$sig" == KILL ]] || log "stopped"
}
