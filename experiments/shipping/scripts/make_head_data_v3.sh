#!/usr/bin/env bash
# Extra training heads of the v3 recipe (experiments/shipping/configs/head-rss-v3.yaml): fresh seeds, wider
# matrices (96-320) and coil counts (8-24) than make_head_data.sh (next to this script), which must run first, and
# SNR up to 70 dB (practically noise-free) so that a noise floor is not learned as part of every image,
# and 100 skull-stripped volumes (the brain alone in the head's field of view) so that a head is not
# painted around every brain.
set -euo pipefail
VARNET=${VARNET:-.venv/bin/varnet}
OUT=${OUT:-data/head}
COMMON="--head --matrix-range 96 320 --coil-range 8 24 --snr-range 15 70 --threads 1"
for seed in 31 32; do
  $VARNET synth $OUT/train_d$seed --source mni,colin --volumes 150 --slices 4 --seed $seed $COMMON > /dev/null &
done
wait
for seed in 41 42; do
  $VARNET synth $OUT/train_e$seed --source mni,colin --volumes 50 --slices 4 --seed $seed --brain-only-fraction 1 $COMMON > /dev/null &
done
wait
$VARNET synth $OUT/val_hi --source mni,colin --volumes 8 --slices 2 --seed 33 $COMMON > /dev/null &
$VARNET synth $OUT/test_inia_hi --source inia --volumes 8 --slices 2 --seed 34 $COMMON > /dev/null &
wait
