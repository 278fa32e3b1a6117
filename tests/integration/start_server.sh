#!/usr/bin/env bash
# Start a live WebUI for the integration tiers, in the background, holding the machine's one-server lock.
#
#   tests/integration/start_server.sh a1111|forge|neo|classic|reforge [extra launch.py flags...]
#
# Prints the URL (last line of stdout) once the API answers and a 1-step 64x64 txt2img has loaded the checkpoint;
# exits non-zero with the log tail if the server dies or is not ready in time. Stop it with stop_server.sh.
# The lock /tmp/klora-server.lock is taken here and inherited by the server, so it is held exactly as long as the
# server runs (released when it exits). Already inside `flock /tmp/klora-server.lock ...`? That is detected (the
# lock's holder is an ancestor of this script) and the lock is not taken twice.
# Environment (defaults in brackets):
#   KLORA_CKPT      checkpoint [/work/webui/models/Stable-diffusion/random-sd15.safetensors]
#   KLORA_LORA_DIR  LoRA folder [/work/webui/models/Lora]
#   KLORA_PORT      [7860 for a1111, 7861 for forge, 7862 for neo, 7863 for classic, 7864 for reforge]
#   KLORA_LOCK_WAIT seconds to wait for another helper's server to stop [3600]
#   KLORA_READY_WAIT seconds to wait for readiness [1800]
#   KLORA_CACHE_PATH K-LoRA score cache used by the server [/tmp/klora-cache/scores.json]
#   KLORA_WEBUI_DIR / KLORA_WEBUI_VENV [/work/webui, /work/webui-venv]; KLORA_FORGE_DIR / KLORA_FORGE_VENV likewise,
#   KLORA_NEO_DIR / KLORA_NEO_VENV [/work/neo, /work/neo-venv], KLORA_CLASSIC_DIR / KLORA_CLASSIC_VENV likewise
#   KLORA_REFORGE_DIR / KLORA_REFORGE_VENV [/work/reforge, /work/reforge-venv]
set -euo pipefail

HOST=${1:-}
[ $# -gt 0 ] && shift
LOCK=/tmp/klora-server.lock
PIDFILE=/tmp/klora-server.pid
LOG=/tmp/klora-server.log
CKPT=${KLORA_CKPT:-/work/webui/models/Stable-diffusion/random-sd15.safetensors}
LORA_DIR=${KLORA_LORA_DIR:-/work/webui/models/Lora}
export KLORA_CACHE_PATH=${KLORA_CACHE_PATH:-/tmp/klora-cache/scores.json}
mkdir -p "$(dirname "$KLORA_CACHE_PATH")"

case "$HOST" in
a1111)
    DIR=${KLORA_WEBUI_DIR:-/work/webui}
    PY=${KLORA_WEBUI_VENV:-/work/webui-venv}/bin/python
    PORT=${KLORA_PORT:-7860}
    FLAGS=(--skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check
        --use-cpu all --no-half --precision full --api --port "$PORT"
        --ckpt "$CKPT" --lora-dir "$LORA_DIR" --no-download-sd-model)
    ;;
forge)
    DIR=${KLORA_FORGE_DIR:-/work/forge}
    PY=${KLORA_FORGE_VENV:-/work/forge-venv}/bin/python
    PORT=${KLORA_PORT:-7861}
    FLAGS=(--skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check
        --skip-python-version-check --always-cpu --all-in-fp32 --api --port "$PORT"
        --ckpt-dir "$(dirname "$CKPT")" --ckpt "$CKPT" --lora-dir "$LORA_DIR" --no-download-sd-model)
    ;;
neo)
    # Forge Neo has no --ckpt: it loads the first checkpoint it lists, so it gets a folder holding only KLORA_CKPT
    DIR=${KLORA_NEO_DIR:-/work/neo}
    PY=${KLORA_NEO_VENV:-/work/neo-venv}/bin/python
    PORT=${KLORA_PORT:-7862}
    CKPT_ONLY=/tmp/klora-neo-ckpt/$(basename "$CKPT" .safetensors)
    mkdir -p "$CKPT_ONLY" && ln -sfn "$CKPT" "$CKPT_ONLY/$(basename "$CKPT")"
    FLAGS=(--skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check
        --skip-python-version-check --always-cpu --all-in-fp32 --api --port "$PORT"
        --ckpt-dirs "$CKPT_ONLY" --lora-dir "$LORA_DIR"
        --attention-pytorch)  # Neo 7862a96's basic/split attention read args.dont_upcast_attention, which its parser lacks (HTTP 500)
    ;;
classic | reforge)
    # Forge Classic and reForge main (Panchovix) take the same flags (the same cmd_args / ldm_patched argument names)
    if [ "$HOST" = classic ]; then
        DIR=${KLORA_CLASSIC_DIR:-/work/classic}
        PY=${KLORA_CLASSIC_VENV:-/work/classic-venv}/bin/python
        PORT=${KLORA_PORT:-7863}
    else
        DIR=${KLORA_REFORGE_DIR:-/work/reforge}
        PY=${KLORA_REFORGE_VENV:-/work/reforge-venv}/bin/python
        PORT=${KLORA_PORT:-7864}
    fi
    FLAGS=(--skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check
        --skip-python-version-check --always-cpu --all-in-fp32 --api --port "$PORT"
        --ckpt-dir "$(dirname "$CKPT")" --ckpt "$CKPT" --lora-dir "$LORA_DIR" --no-download-sd-model)
    ;;
*)
    echo "usage: $0 a1111|forge|neo|classic|reforge [extra launch.py flags...]" >&2
    exit 2
    ;;
esac
URL=http://127.0.0.1:$PORT

# Is the lock already held by one of our ancestors (a `flock $LOCK ...` wrapper)?
held_by_ancestor() {
    local inode holders pid
    inode=$(stat -c %i "$LOCK" 2>/dev/null) || return 1
    holders=$(awk -v ino=":$inode" '$2 == "FLOCK" && substr($6, length($6) - length(ino) + 1) == ino {print $5}' /proc/locks)
    pid=$$
    while [ "$pid" -gt 1 ]; do
        for h in $holders; do [ "$h" = "$pid" ] && return 0; done
        pid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null) || return 1
    done
    return 1
}
touch "$LOCK"
if held_by_ancestor; then
    echo "lock $LOCK already held by an ancestor process; not taking it again" >&2
else
    exec 9>>"$LOCK"
    if ! flock -n 9; then
        echo "waiting up to ${KLORA_LOCK_WAIT:-3600} s for $LOCK (another server runs: $(cat /tmp/klora-server.url 2>/dev/null))" >&2
        flock -w "${KLORA_LOCK_WAIT:-3600}" 9 || { echo "gave up waiting for $LOCK" >&2; exit 1; }
    fi
fi

# A server that has just released the lock may still exist for a moment (exiting, or a zombie nobody reaped yet,
# which `kill -0` still finds): give it a minute to go before calling it a running server.
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    case "$state" in Z* | X* | "") return 1 ;; esac
}
if [ -s "$PIDFILE" ]; then
    old=$(cat "$PIDFILE")
    for _ in $(seq 60); do alive "$old" || break; sleep 1; done
    if alive "$old"; then
        echo "a server is already running: pid $old ($(cat /tmp/klora-server.url 2>/dev/null)); stop it first" >&2
        exit 1
    fi
fi

# Live previews off (SDXL's "Approx NN" preview would try to download a model); only seeds a fresh config.
[ -e "$DIR/config.json" ] || echo '{"live_previews_enable": false, "show_progress_type": "Approx cheap"}' > "$DIR/config.json"

cd "$DIR"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DO_NOT_TRACK=1 \
    setsid "$PY" launch.py "${FLAGS[@]}" "$@" >"$LOG" 2>&1 &
SERVER_PID=$!
exec 9>&- # the server keeps its inherited copy of the lock
echo "$SERVER_PID" >"$PIDFILE"
echo "$URL" >/tmp/klora-server.url
echo "started $HOST pid $SERVER_PID, log $LOG; waiting for $URL ..." >&2

fail() {
    echo "$HOST server not ready: $1; last log lines:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
}
deadline=$((SECONDS + ${KLORA_READY_WAIT:-1800}))
until curl -sf -o /dev/null "$URL/sdapi/v1/sd-models"; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "process exited"
    [ $SECONDS -lt $deadline ] || fail "API did not answer in time"
    sleep 3
done
# one tiny generation: Forge loads the checkpoint lazily; A1111 answers it once its model load is done
warm='{"prompt":"warm up","steps":1,"width":64,"height":64,"sampler_name":"Euler","override_settings":{"live_previews_enable":false}}'
code=$(curl -s -o /tmp/klora-server-warmup.json -w '%{http_code}' --max-time "${KLORA_READY_WAIT:-1800}" \
    -H 'Content-Type: application/json' -d "$warm" "$URL/sdapi/v1/txt2img") || true
[ "$code" = 200 ] || fail "warm-up txt2img answered HTTP $code: $(head -c 500 /tmp/klora-server-warmup.json 2>/dev/null)"
echo "$HOST ready: $URL (pid $SERVER_PID, log $LOG)" >&2
echo "$URL"
