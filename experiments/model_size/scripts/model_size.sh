#!/usr/bin/env bash
# Model size, chosen on held-out data (docs/results/model_size.md): three sizes trained from scratch with the
# whole-head recipe at an equal step budget (800 steps, lr 1e-3), then scored by
#   python experiments/generalisation/scripts/generalisation_matrix.py \
#       experiments/model_size/configs/model_size.yaml --out results/model_size
# small 4 cascades x 6 channels (1.2 M parameters), shipped 6 x 8 (3.0 M), large 10 x 8 (5.0 M, the
# most that fits the 20 MB weight limit in float32).
set -euo pipefail
VARNET=${VARNET:-.venv/bin/varnet}
STEPS=${STEPS:-800}
COMMON=(--config experiments/shipping/configs/head-rss.yaml --set optim.epochs=1 --set run.max_steps_per_epoch=$STEPS
        --set run.tensorboard=false --set run.init_from=null --set optim.lr=1.0e-3)
$VARNET train "${COMMON[@]}" --set model.num_cascades=4 --set model.chans=6 --set run.out_dir=runs/size-4x6
$VARNET train "${COMMON[@]}" --set model.num_cascades=6 --set model.chans=8 --set run.out_dir=runs/size-6x8
$VARNET train "${COMMON[@]}" --set model.num_cascades=10 --set model.chans=8 --set run.out_dir=runs/size-10x8
