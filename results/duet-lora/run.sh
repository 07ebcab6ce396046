#!/usr/bin/env bash
# DUET on the synthetic catalogue with LoRA: SFT on template teacher profiles (scripts/make_sft_pairs.py: DUET's
# format, the user's rounded average), then GRPO on that adapter, evaluated on 512 test examples against 10H and
# the zero-shot writer (SmolLM2-135M-Instruct writes and rates).
# Every stage is skipped when its output exists and GRPO resumes, so an interrupted run continues where it stopped:
#   bash results/duet-lora/run.sh [SEED]      (SEED: the synthetic catalogue's seed, default 0)
# Outputs: runs/duet-lora-s$SEED/{sft,grpo}, results/duet-lora/s$SEED/{10h,zero-shot,sft,grpo}.
set -euo pipefail
SEED=${1:-0}
M=smollm2-135m-instruct
DATA=out/data/synthetic-seed$SEED
RUNS=runs/duet-lora-s$SEED
OUT=results/duet-lora/s$SEED
GRPO_STEPS=${GRPO_STEPS:-10}
TASK=(--user-history 8 --item-history 3 --review-chars 60 --max-new-tokens 160 --response-prefix "<user_profile><cue>")
LORA=(--lora-rank 16 --lora-alpha 32)
[ -d $DATA ] || python scripts/prepare_data.py --source synthetic --seed $SEED --out $DATA --no-progress
ev() {  # ev NAME [writer flags]: 512 fixed test examples, the writer prompted as in training
  local name=$1; shift
  [ -f $OUT/$name/metrics.json ] || python scripts/evaluate.py --recommender $M --data $DATA --split test --limit 512 \
    --profile-history 8 --item-history 3 --review-chars 60 --max-new-tokens 160 --gen-batch-size 16 \
    --response-prefix "<user_profile><cue>" --out $OUT/$name "$@"
}
ev 10h --method 10h
[ -f $RUNS/teacher.jsonl ] || python scripts/make_sft_pairs.py --data $DATA --out $RUNS/teacher.jsonl --targets 64 \
  --user-history 8 --item-history 3 --review-chars 60
[ -f $RUNS/sft/checkpoints/step_16/adapter/adapter_model.safetensors ] || \
  python scripts/train_sft.py --data $DATA --run-dir $RUNS/sft "${TASK[@]}" "${LORA[@]}" --lr 2e-4 \
    --source jsonl --pairs $RUNS/teacher.jsonl --max-steps 16 --save-every 16 --val-every 0
python scripts/train_grpo.py --data $DATA --run-dir $RUNS/grpo "${TASK[@]}" "${LORA[@]}" --lr 1e-4 \
  --init-adapter $RUNS/sft/checkpoints/step_16/adapter --max-steps $GRPO_STEPS --save-every 5 --val-every 0 --resume
ev grpo --method duet --generator $M --adapter $RUNS/grpo/checkpoints/step_$GRPO_STEPS/adapter
ev sft --method duet --generator $M --adapter $RUNS/sft/checkpoints/step_16/adapter
ev zero-shot --method duet --generator $M
for x in zero-shot sft grpo; do python scripts/evaluate.py --paired $OUT/10h $OUT/$x --fallback; done
for x in sft grpo; do python scripts/evaluate.py --paired $OUT/zero-shot $OUT/$x --fallback; done
