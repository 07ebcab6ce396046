#!/usr/bin/env bash
# DUET with LoRA, run.sh's task, a teacher that states a rating for the target: SFT on pairs whose user profile is
# read off the 8 ratings the writer is shown (scripts/make_sft_pairs.py --teacher attributes: the user's ratings of
# the albums among them sharing the target's mood and genre), then GRPO from that adapter. Evaluated on run.sh's
# 512 test examples, paired against its 10H and zero-shot folders (run.sh must have run for SEED first).
# Every stage is skipped when its output exists, and training resumes, so an interrupted run continues:
#   bash results/duet-lora/attributes.sh [SEED]     (SFT_STEPS, default 32; GRPO_STEPS, default 10; 0 skips GRPO)
# Outputs: runs/duet-lora-s$SEED/attr-{sft,grpo}, results/duet-lora/s$SEED/{attr-sft,attr-grpo}.
set -euo pipefail
SEED=${1:-0}
M=smollm2-135m-instruct
DATA=out/data/synthetic-seed$SEED
RUNS=runs/duet-lora-s$SEED
OUT=results/duet-lora/s$SEED
SFT_STEPS=${SFT_STEPS:-32}
GRPO_STEPS=${GRPO_STEPS:-10}
TASK=(--user-history 8 --item-history 3 --review-chars 60 --max-new-tokens 160 --response-prefix "<user_profile><cue>")
LORA=(--lora-rank 16 --lora-alpha 32)
ev() {  # ev NAME [writer flags]: run.sh's 512 test examples, the writer prompted as in training
  local name=$1; shift
  [ -f $OUT/$name/metrics.json ] || python scripts/evaluate.py --recommender $M --data $DATA --split test --limit 512 \
    --profile-history 8 --item-history 3 --review-chars 60 --max-new-tokens 160 --gen-batch-size 16 \
    --response-prefix "<user_profile><cue>" --out $OUT/$name "$@"
}
[ -f $RUNS/teacher-attr.jsonl ] || python scripts/make_sft_pairs.py --data $DATA --out $RUNS/teacher-attr.jsonl \
  --targets 1024 --user-history 8 --item-history 3 --review-chars 60 --teacher attributes
SFT=$RUNS/attr-sft/checkpoints/step_$SFT_STEPS/adapter
[ -f $SFT/adapter_model.safetensors ] || python scripts/train_sft.py --data $DATA --run-dir $RUNS/attr-sft "${TASK[@]}" \
  "${LORA[@]}" --lr 3e-4 --source jsonl --pairs $RUNS/teacher-attr.jsonl --max-steps $SFT_STEPS --save-every 8 \
  --val-every 0 --resume
if [ "$GRPO_STEPS" -gt 0 ]; then
  python scripts/train_grpo.py --data $DATA --run-dir $RUNS/attr-grpo "${TASK[@]}" "${LORA[@]}" --lr 1e-4 \
    --init-adapter $SFT --max-steps $GRPO_STEPS --save-every 5 --val-every 0 --resume
  ev attr-grpo --method duet --generator $M --adapter $RUNS/attr-grpo/checkpoints/step_$GRPO_STEPS/adapter &
fi
ev attr-sft --method duet --generator $M --adapter $SFT
wait
for x in attr-sft attr-grpo; do
  [ -f $OUT/$x/metrics.json ] || continue
  python scripts/evaluate.py --paired $OUT/10h $OUT/$x --fallback
  python scripts/evaluate.py --paired $OUT/zero-shot $OUT/$x --fallback
done
[ -f $OUT/attr-grpo/metrics.json ] && python scripts/evaluate.py --paired $OUT/attr-sft $OUT/attr-grpo --fallback
