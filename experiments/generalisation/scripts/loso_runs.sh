#!/usr/bin/env bash
# Leave-one-source-out runs for the generalisation matrix (docs/results/shipped-weights.md): the whole-head recipe
# (experiments/shipping/configs/head-rss.yaml) at an equal, small budget of 640 steps from the same start,
# trained on one anatomy source and validated on that source only; the other source and INIA19
# are held out. Compare with runs/head-rss epoch 1 (640 steps on both sources).
set -euo pipefail
VARNET=${VARNET:-.venv/bin/varnet}
for src in mni colin; do
  $VARNET train --config experiments/shipping/configs/head-rss.yaml \
    --set "data.train_dirs=[data/head/train_only_$src]" --set "data.val_dirs=[data/head/val_only_$src]" \
    --set optim.epochs=2 --set run.max_steps_per_epoch=320 --set run.out_dir=runs/loso-only-$src \
    --set run.tensorboard=false
done
