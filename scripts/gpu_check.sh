#!/usr/bin/env bash
# One prepared check of the GPU path on a single GPU without internet (scripts/gpu_check.py says what each stage
# measures): random weights of Qwen3-0.6B's shapes, built on the fly; bf16 against fp32 logits; decode tokens/s
# against the HBM bound; training MFU; two GRPO steps and two DPO steps under torchrun --nproc_per_node=1 with
# --fsdp (nccl, FSDP2, bf16 param_dtype), their per-phase peak memory against rl/memory.py's plan.
#
#   bash scripts/gpu_check.sh                 # writes $OUT/gpu_check.json when OUT is set, else prints the JSON
#   bash scripts/gpu_check.sh --cpu-tiny      # the same stages on a tiny model on the CPU (gloo), for tests
#
# Every stage runs under a time limit (under 8 minutes in all), so a stuck stage fails instead of hanging; a
# failed stage is reported with its exit status and the next one still runs. Exit status: 0 when every stage
# passed, 1 when one failed, 3 without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=cuda
TINY=()
LIMITS=(80 140 100 100)  # seconds: build, kernels, grpo, dpo (the report takes a second)
if [[ "${1:-}" == "--cpu-tiny" ]]; then
    DEVICE=cpu
    TINY=(--tiny)
    LIMITS=(60 120 120 120)
elif ! timeout 30 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: no CUDA device: torch.cuda.is_available() is False (or torch did not import) for $PY" >&2
    exit 3
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STATUS="$WORK/status.txt"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false
export PROFILES_CACHE="$WORK/cache" HF_HUB_OFFLINE=1

stage() {  # stage NAME LIMIT COMMAND...: run it under the limit, log its output, record its status and seconds
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (at most ${limit}s)" >&2
    timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - start))" >> "$STATUS"
    if [[ $rc -ne 0 ]]; then
        local why=""
        [[ $rc -eq 124 || $rc -eq 137 ]] && why=" (time limit)"
        echo "gpu_check: stage $name failed with status $rc$why; the end of its log:" >&2
        tail -n 30 "$WORK/$name.log" >&2
    fi
    return 0
}

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
stage build "${LIMITS[0]}" "$PY" scripts/gpu_check.py build --out "$WORK/model" "${TINY[@]}"
stage kernels "${LIMITS[1]}" "$PY" scripts/gpu_check.py kernels --model "$WORK/model" --device "$DEVICE" \
    "${TINY[@]}" --json "$WORK/kernels.json"
stage grpo "${LIMITS[2]}" "${TORCHRUN[@]}" scripts/gpu_check.py grpo --model "$WORK/model" --work "$WORK" \
    --device "$DEVICE" "${TINY[@]}" --json "$WORK/grpo.json"
stage dpo "${LIMITS[3]}" "${TORCHRUN[@]}" scripts/gpu_check.py dpo --model "$WORK/model" --work "$WORK" \
    --device "$DEVICE" "${TINY[@]}" --json "$WORK/dpo.json"

OUTFILE=()
[[ -n "${OUT:-}" ]] && OUTFILE=(--out "$OUT/gpu_check.json")
"$PY" scripts/gpu_check.py report --parts "$WORK/kernels.json" "$WORK/grpo.json" "$WORK/dpo.json" \
    --status "$STATUS" "${OUTFILE[@]}"
[[ -n "${OUT:-}" ]] && cp "$WORK"/*.log "$OUT"/ 2>/dev/null
if awk '$2 != 0 { bad = 1 } END { exit !bad }' "$STATUS"; then
    exit 1
fi
exit 0
