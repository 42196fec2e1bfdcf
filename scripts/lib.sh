# Helpers shared by scripts/kafka.sh and scripts/redis.sh; sourced by them, not run on its own.
# The caller sets, before sourcing: LOG_TAG (the prefix of its messages: kafka, redis),
# LOCK_DIR (where its .lock lives) and HOST.

log() { echo "[$LOG_TAG] $*" >&2; }
die() { echo "[$LOG_TAG] ERROR: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Serialise state-changing commands (e.g. parallel test workers all calling `start`).
# fd 9 is closed for the server process so it does not inherit the lock.
take_lock() {
  mkdir -p "$LOCK_DIR"
  exec 9>"$LOCK_DIR/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 300 9 || die "timed out waiting for $LOCK_DIR/.lock (another $0 still running?)"
  fi
}
