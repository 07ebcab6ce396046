#!/usr/bin/env bash
# A trained DUET writer on a catalogue it was not trained on: run.sh's 512 test examples of the synthetic catalogue of
# seed SEED, the adapter's profiles against 10H and the zero-shot writer (SmolLM2-135M-Instruct writes and rates).
#   bash results/duet-lora/transfer.sh SEED ADAPTER NAME
# e.g. bash results/duet-lora/transfer.sh 1 results/trained/duet-grpo attr-grpo-from-s0
# Every stage is skipped when its output exists. Outputs: results/duet-lora/s$SEED/{10h,zero-shot,NAME}.
set -euo pipefail
SEED=$1; ADAPTER=$2; NAME=$3
M=smollm2-135m-instruct
DATA=out/data/synthetic-seed$SEED
OUT=results/duet-lora/s$SEED
[ -d $DATA ] || python scripts/prepare_data.py --source synthetic --seed $SEED --out $DATA --no-progress
ev() {  # ev NAME [writer flags]: 512 fixed test examples, the writer prompted as in training
  local name=$1; shift
  [ -f $OUT/$name/metrics.json ] || python scripts/evaluate.py --recommender $M --data $DATA --split test --limit 512 \
    --profile-history 8 --item-history 3 --review-chars 60 --max-new-tokens 160 --gen-batch-size 16 \
    --response-prefix "<user_profile><cue>" --out $OUT/$name "$@"
}
ev 10h --method 10h
ev zero-shot --method duet --generator $M &
ev $NAME --method duet --generator $M --adapter $ADAPTER
wait
for x in zero-shot $NAME; do python scripts/evaluate.py --paired $OUT/10h $OUT/$x --fallback; done
python scripts/evaluate.py --paired $OUT/zero-shot $OUT/$NAME --fallback
