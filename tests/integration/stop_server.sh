#!/usr/bin/env bash
# Stop the server that start_server.sh started (its whole process group); its lock is released when it exits.
set -uo pipefail
PIDFILE=/tmp/klora-server.pid
[ -s "$PIDFILE" ] || { echo "no server pid file ($PIDFILE)" >&2; exit 0; }
PID=$(cat "$PIDFILE")
if kill -0 "$PID" 2>/dev/null; then
    kill -TERM -- "-$PID" 2>/dev/null || kill -TERM "$PID"
    for _ in $(seq 60); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$PID" 2>/dev/null && kill -KILL -- "-$PID" 2>/dev/null
    echo "stopped server pid $PID" >&2
else
    echo "server pid $PID was not running" >&2
fi
rm -f "$PIDFILE" /tmp/klora-server.url
