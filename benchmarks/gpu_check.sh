#!/usr/bin/env bash
# One-command device check: the core benchmark (cold scoring vs the bare products, SD1.5 and SDXL pairs) and the
# per-step overhead benchmark (K-LoRA cached pair vs plain two-LoRA on SDXL-sized layers, fake Forge host), on CUDA
# when torch sees a GPU, else on the CPU (same scripts, CPU defaults). Prints every figure, then the ratio lines.
#   benchmarks/gpu_check.sh            # under 5 minutes on a GPU; ~5-10 minutes on a 2-core CPU
#   PYTHON=/path/to/python DEVICE=cuda:1 benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
LOG=$(mktemp -t klora-gpu-check.XXXXXX)
trap 'rm -f "$LOG"' EXIT
echo "== K-LoRA device check on $DEVICE ($(date -u +%FT%TZ)); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ $DEVICE == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" benchmarks/bench_core.py --device "$DEVICE" --repeat 3 | tee "$LOG"
echo
# CPU: fewer steps (an SDXL-sized step takes seconds there); the token counts are scaled down by bench_step itself
STEP_ARGS=()
[[ $DEVICE == cuda* ]] || STEP_ARGS=(--steps 8 --repeat 1)
"$PY" benchmarks/bench_step.py --device "$DEVICE" "${STEP_ARGS[@]}" | tee -a "$LOG"
echo
echo "== summary ($DEVICE; load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
grep -E '^(sd15|sdxl|sd15-locon): cold scoring|^per-step: |plan identical' "$LOG"
