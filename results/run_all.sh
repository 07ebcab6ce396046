#!/usr/bin/env bash
# Reproduces results/music and results/synthetic (CPU, float32, SmolLM2-135M-Instruct as generator and recommender).
# Run from the repository root:  bash results/run_all.sh [MODEL]   (MODEL: smollm2-135m-instruct or an HF dir)
# CPU budget: the profile methods (kar, palr, rlmrec, lg, duet) run on a fixed random subset of 16 test examples
# (--limit 16, seed 0) with profiles of at most 192 tokens written from the last 10 interactions; the other rows
# on the whole Music test split (64).
set -euo pipefail
M=${1:-${SMOLLM2_DIR:-smollm2-135m-instruct}}
SHARED=${SHARED:-../shared}
DATA=${DATA:-out/data}
S=$SHARED/data/amazon-digital-music-2014-sample
[ -d $DATA/music ] || python scripts/prepare_data.py --source amazon2014 --reviews $S/reviews_Digital_Music_5.sample.json.gz \
    --meta $S/meta_Digital_Music.sample.json.gz --out $DATA/music --no-progress
[ -d $DATA/synthetic ] || python scripts/prepare_data.py --source synthetic --out $DATA/synthetic --no-progress
run() { python scripts/evaluate.py --generator $M --recommender $M --split test "$@"; }
for m in global-mean user-mean item-mean mf 10h; do run --method $m --data $DATA/music --limit 100 --out results/music/$m; done
for m in global-mean user-mean mf 10h oracle; do run --method $m --data $DATA/synthetic --limit 256 --out results/synthetic/$m; done
for m in global-mean user-mean item-mean mf 10h kar palr rlmrec lg duet; do
  run --method $m --data $DATA/music --limit 16 --profile-history 10 --max-new-tokens 192 --gen-batch-size 16 --out results/music16/$m
done
python scripts/evaluate.py --compare results/music/{global-mean,user-mean,item-mean,mf,10h} > results/music/table.md
python scripts/evaluate.py --compare results/synthetic/{global-mean,user-mean,mf,10h,oracle} > results/synthetic/table.md
python scripts/evaluate.py --compare results/music16/{global-mean,user-mean,item-mean,mf,10h,kar,palr,rlmrec,lg,duet} > results/music16/table.md
