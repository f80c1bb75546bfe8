#!/usr/bin/env bash
# Recipe choices (docs/results/recipe_choices.md) at the leave-one-source-out budget (640 steps from v1, both training
# sources), compared with runs/head-rss after its first epoch (RSS output, noisy RSS target):
#   sense output (|Σ S* x| with the model's maps) and the noise-free target.
set -euo pipefail
VARNET=${VARNET:-.venv/bin/varnet}
COMMON=(--config experiments/shipping/configs/head-rss.yaml --set optim.epochs=1 --set run.max_steps_per_epoch=640 --set run.tensorboard=false)
$VARNET train "${COMMON[@]}" --set model.output=sense --set run.out_dir=runs/choice-sense-640
$VARNET train "${COMMON[@]}" --set data.target=target_noise_free --set run.out_dir=runs/choice-noisefree-640
