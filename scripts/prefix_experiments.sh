#!/usr/bin/env bash
# The experiments of docs/RESULTS.md, "Training for the anytime order": 256-M-4-H on Fashion-MNIST,
# 40 epochs, 3 seeds per variant, the prefix loss with the cosine schedule (uniform weights for 40 and
# 100 epochs, and one seed for 200; uniform weights with left-right flips for 100; small weights for 40
# and 100; small weights at twice the prefix term for 40, one seed), then the anytime reports. Each sweep
# resumes where it stopped, so running this again continues an interrupted session. On 2 cores: about
# seven hours (two trainings at a time, one thread each).
#
#   scripts/prefix_experiments.sh [OUT]      # default OUT: sweeps
set -euo pipefail
OUT=${1:-sweeps}
COMMON=(--configs 256-M-4-H --trials 3 --quiet)
export OMP_NUM_THREADS=1  # one thread per training: the sweeps run side by side

run() { nice -n 10 quorum sweep "${COMMON[@]}" "$@"; }
{
    run --out "$OUT/i22-prefix-uniform-cosine100" --epochs 100 --lams 0.99 --loss prefix --prefix-weights uniform \
        --schedule cosine
    run --out "$OUT/i22-prefix-small" --epochs 40 --lams 0.99 --loss prefix --prefix-weights small
    run --out "$OUT/i22-dropout" --epochs 40 --lams 0.99 --loss dropout --prefix-weights uniform
    run --out "$OUT/i22-prefix-small-cosine" --epochs 40 --lams 0.99 --loss prefix --prefix-weights small \
        --schedule cosine
    run --out "$OUT/i22-prefix-small2-cosine" --epochs 40 --lams 0.99 --loss prefix --prefix-weights small \
        --prefix-scale 2 --schedule cosine --trials 1
    run --out "$OUT/i22-prefix-small-cosine100" --epochs 100 --lams 0.99 --loss prefix --prefix-weights small \
        --schedule cosine
    run --out "$OUT/i22-prefix-uniform-cosine100-flip" --epochs 100 --lams 0.99 --loss prefix \
        --prefix-weights uniform --schedule cosine --augment --augment-pad 0
} &
{
    run --out "$OUT/i22-modular" --epochs 40 --lams 0.99,1
    run --out "$OUT/i22-prefix-uniform" --epochs 40 --lams 0.99 --loss prefix --prefix-weights uniform
    run --out "$OUT/i22-prefix-uniform-cosine" --epochs 40 --lams 0.99 --loss prefix --prefix-weights uniform \
        --schedule cosine
    run --out "$OUT/i22-modular-cosine" --epochs 40 --lams 0.99 --schedule cosine --trials 1
    run --out "$OUT/i22-prefix-uniform-cosine200" --epochs 200 --lams 0.99 --loss prefix --prefix-weights uniform \
        --schedule cosine --trials 1
} &
wait

quorum anytime "$OUT"/i22-modular "$OUT"/i22-prefix-uniform "$OUT"/i22-prefix-small "$OUT"/i22-dropout \
    "$OUT"/i22-prefix-uniform-cosine "$OUT"/i22-prefix-uniform-cosine100 "$OUT"/i22-prefix-uniform-cosine200 \
    "$OUT"/i22-prefix-small-cosine "$OUT"/i22-prefix-small-cosine100 "$OUT"/i22-prefix-small2-cosine \
    "$OUT"/i22-modular-cosine --out docs/results/anytime-40
quorum anytime "$OUT"/i22-prefix-uniform-cosine100-flip --out docs/results/anytime-flip
python bench/prefix_loss.py --images 5000 --rounds 3 --threads 1
