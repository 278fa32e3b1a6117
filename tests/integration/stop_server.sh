#!/usr/bin/env bash
# Stop the server that start_server.sh started (its whole process group); its lock is released when it exits.
#   tests/integration/stop_server.sh [PID]   (with PID: only if that is still the running server)
set -uo pipefail
PIDFILE=/tmp/klora-server.pid
[ -s "$PIDFILE" ] || { echo "no server pid file ($PIDFILE)" >&2; exit 0; }
PID=$(cat "$PIDFILE")
# `stop_server.sh <pid>` (the pid start_server.sh printed) stops only that server: a later turn's server is left alone
if [ -n "${1:-}" ] && [ "$1" != "$PID" ]; then
    echo "not stopping: the running server is pid $PID ($(cat /tmp/klora-server.url 2>/dev/null)), not $1" >&2
    exit 0
fi
alive() { # a zombie (exited, not yet reaped) counts as stopped
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    case "$state" in Z* | X* | "") return 1 ;; esac
}
# Remove the pid file BEFORE the server exits: the lock is free the moment it does, and the next start_server.sh
# writes its own pid file then, which a late `rm` here would delete.
rm -f "$PIDFILE" /tmp/klora-server.url
if alive "$PID"; then
    kill -TERM -- "-$PID" 2>/dev/null || kill -TERM "$PID"
    for _ in $(seq 60); do alive "$PID" || break; sleep 1; done
    alive "$PID" && kill -KILL -- "-$PID" 2>/dev/null
    echo "stopped server pid $PID" >&2
else
    echo "server pid $PID was not running" >&2
fi
