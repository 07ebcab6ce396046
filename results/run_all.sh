#!/usr/bin/env bash
# Reproduces results/music and results/synthetic (CPU, float32). Run from the repository root:
#   bash results/run_all.sh [MODEL]      MODEL defaults to smollm2-135m-instruct (or set SMOLLM2_DIR's path)
set -euo pipefail
M=${1:-${SMOLLM2_DIR:-smollm2-135m-instruct}}
SHARED=${SHARED:-../shared}
DATA=${DATA:-out/data}
S=$SHARED/data/amazon-digital-music-2014-sample
[ -d $DATA/music ] || python scripts/prepare_data.py --source amazon2014 --reviews $S/reviews_Digital_Music_5.sample.json.gz \
    --meta $S/meta_Digital_Music.sample.json.gz --out $DATA/music --no-progress
[ -d $DATA/synthetic ] || python scripts/prepare_data.py --source synthetic --out $DATA/synthetic --no-progress
for m in global-mean user-mean item-mean mf 10h kar palr rlmrec lg duet; do
  python scripts/evaluate.py --method $m --generator $M --recommender $M --data $DATA/music --split test \
      --limit 100 --gen-batch-size 16 --out results/music/$m
done
for m in global-mean user-mean mf 10h oracle; do
  python scripts/evaluate.py --method $m --recommender $M --data $DATA/synthetic --split test --limit 200 \
      --out results/synthetic/$m
done
python scripts/evaluate.py --compare results/music/{global-mean,user-mean,item-mean,mf,10h,kar,palr,rlmrec,lg,duet} \
    > results/music/table.md
python scripts/evaluate.py --compare results/synthetic/{global-mean,user-mean,mf,10h,oracle} > results/synthetic/table.md
