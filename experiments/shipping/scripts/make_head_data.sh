#!/usr/bin/env bash
# Data of the whole-head recipe (docs/guide/training.md): domain-randomised heads from `varnet synth --head`.
# Training sources MNI and Colin27; INIA19 (a macaque brain at human size) is held out for testing.
# Two synth processes in parallel (2 cores); about 4 s per 4-slice volume each.
set -euo pipefail
VARNET=${VARNET:-.venv/bin/varnet}
OUT=${OUT:-data/head}
COMMON="--head --matrix-range 96 224 --coil-range 8 16 --threads 1"
$VARNET synth $OUT/train_a --source mni,colin --volumes 80 --slices 4 --seed 11 $COMMON > /dev/null &
$VARNET synth $OUT/train_b --source mni,colin --volumes 80 --slices 4 --seed 12 $COMMON > /dev/null &
wait
$VARNET synth $OUT/val --source mni,colin --volumes 8 --slices 2 --seed 13 $COMMON > /dev/null &
$VARNET synth $OUT/test_inia --source inia --volumes 8 --slices 2 --seed 14 $COMMON > /dev/null &
wait
$VARNET synth $OUT/test_seen --source mni,colin --volumes 8 --slices 2 --seed 15 $COMMON > /dev/null
# one folder per source, for leave-one-source-out runs and the generalisation matrix
.venv/bin/python experiments/shipping/scripts/split_by_source.py $OUT/train_only $OUT/train_a $OUT/train_b
.venv/bin/python experiments/shipping/scripts/split_by_source.py $OUT/val_only $OUT/val
.venv/bin/python experiments/shipping/scripts/split_by_source.py $OUT/test $OUT/test_seen
