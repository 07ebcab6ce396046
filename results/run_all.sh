#!/usr/bin/env bash
# Reproduces results/music and results/synthetic (CPU, float32, SmolLM2-135M-Instruct as generator and recommender).
# Run from the repository root:  bash results/run_all.sh [MODEL]   (MODEL: smollm2-135m-instruct or an HF dir)
# CPU budget: the profile methods (kar, palr, rlmrec, lg, duet) run on a fixed random subset of 16 test examples
# (--limit 16, seed 0) with profiles of at most 192 tokens written from the last 10 interactions; the other rows
# on the whole Music test split (64).
# The Music rows were computed on the Digital Music sample (the first 6,908 reviews of the official 2014 5-core file
# and their metadata): point MUSIC_REVIEWS and MUSIC_META at those files. Without them the official files are
# downloaded (--download) and the Music rows are those of the whole dataset.
set -euo pipefail
M=${1:-${SMOLLM2_DIR:-smollm2-135m-instruct}}
DATA=${DATA:-out/data}
if [ ! -d $DATA/music ]; then
  if [ -n "${MUSIC_REVIEWS:-}" ]; then
    python scripts/prepare_data.py --source amazon2014 --reviews "$MUSIC_REVIEWS" --meta "$MUSIC_META" --out $DATA/music --no-progress
  else
    python scripts/prepare_data.py --source amazon2014 --download --raw $DATA/music_raw --out $DATA/music --no-progress
  fi
fi
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
