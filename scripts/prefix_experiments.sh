#!/usr/bin/env bash
# The experiments of docs/RESULTS.md, "Training for the anytime order": 256-M-4-H on Fashion-MNIST,
# 40 epochs, 3 seeds per variant, then the anytime report. Each sweep resumes where it stopped, so
# running this again continues an interrupted session. On 2 shared cores: several hours.
#
#   scripts/prefix_experiments.sh [OUT]      # default OUT: sweeps
set -euo pipefail
OUT=${1:-sweeps}
COMMON=(--configs 256-M-4-H --trials 3 --epochs 40 --quiet)
export OMP_NUM_THREADS=1  # one thread per training: the sweeps run side by side

nice -n 10 quorum sweep --out "$OUT/i22-modular" --lams 0.99,1 --jobs 2 "${COMMON[@]}" &
nice -n 10 quorum sweep --out "$OUT/i22-prefix-uniform" --lams 0.99 --loss prefix --prefix-weights uniform "${COMMON[@]}" &
nice -n 10 quorum sweep --out "$OUT/i22-prefix-small" --lams 0.99 --loss prefix --prefix-weights small "${COMMON[@]}" &
nice -n 10 quorum sweep --out "$OUT/i22-dropout" --lams 0.99 --loss dropout --prefix-weights uniform "${COMMON[@]}" &
nice -n 10 quorum sweep --out "$OUT/i22-prefix-uniform-cosine" --lams 0.99 --loss prefix --prefix-weights uniform \
    --schedule cosine "${COMMON[@]}" &
# the schedule's 15-epoch run of docs/RESULTS.md (seed 0)
nice -n 10 quorum sweep --out "$OUT/i22-prefix-small-cosine15" --configs 256-M-4-H --lams 0.99 --trials 1 --epochs 15 \
    --quiet --loss prefix --prefix-weights small --schedule cosine &
wait

quorum anytime "$OUT"/i22-modular "$OUT"/i22-prefix-uniform "$OUT"/i22-prefix-small "$OUT"/i22-dropout \
    --out docs/results/anytime-40
python bench/prefix_loss.py --images 5000 --rounds 3 --threads 1
