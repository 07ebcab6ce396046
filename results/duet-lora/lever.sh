#!/usr/bin/env bash
# One lever of the ablation: GRPO from the teacher-SFT adapter of run.sh with extra trainer flags, evaluated on the
# same 512 test examples and paired against 10H (run.sh must have run for SEED first: data, 10h, sft).
#   bash results/duet-lora/lever.sh NAME SEED [train_grpo.py flags...]
#   e.g. bash results/duet-lora/lever.sh dr-grpo 0 --scale-adv-by-std false
# Outputs: runs/duet-lora-s$SEED/grpo-NAME, results/duet-lora/s$SEED/grpo-NAME. Resumes where it stopped.
set -euo pipefail
NAME=$1; SEED=$2; shift 2
M=smollm2-135m-instruct
DATA=out/data/synthetic-seed$SEED
RUNS=runs/duet-lora-s$SEED
OUT=results/duet-lora/s$SEED
GRPO_STEPS=${GRPO_STEPS:-10}
python scripts/train_grpo.py --data $DATA --run-dir $RUNS/grpo-$NAME --user-history 8 --item-history 3 \
  --review-chars 60 --max-new-tokens 160 --response-prefix "<user_profile><cue>" --lora-rank 16 --lora-alpha 32 \
  --lr 1e-4 --init-adapter $RUNS/sft/checkpoints/step_16/adapter --max-steps $GRPO_STEPS --save-every 5 \
  --val-every 0 --resume "$@"
[ -f $OUT/grpo-$NAME/metrics.json ] || python scripts/evaluate.py --recommender $M --data $DATA --split test \
  --limit 512 --profile-history 8 --item-history 3 --review-chars 60 --max-new-tokens 160 --gen-batch-size 16 \
  --response-prefix "<user_profile><cue>" --out $OUT/grpo-$NAME --method duet --generator $M \
  --adapter $RUNS/grpo-$NAME/checkpoints/step_$GRPO_STEPS/adapter
python scripts/evaluate.py --paired $OUT/10h $OUT/grpo-$NAME --fallback
