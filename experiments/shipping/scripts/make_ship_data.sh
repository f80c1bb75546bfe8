#!/usr/bin/env bash
# Data for the shipped weights (see experiments/shipping/configs/ship-synth-brain.yaml); run from the repository root.
set -e
i=0
for src in mni colin; do for ori in axial coronal sagittal; do
  i=$((i+1))
  varnet synth data/ship/train --source $src --orientation $ori --volumes 2 --slices 8 --coils 8 --matrix 128 --seed $((10+i)) --threads 1
done; done
# stage 3 (experiments/shipping/configs/ship-synth-brain-more.yaml): 12 more volumes, new seeds and poses
i=0
for src in mni colin; do for ori in axial coronal sagittal; do
  i=$((i+1))
  varnet synth data/ship/train2 --source $src --orientation $ori --volumes 2 --slices 8 --coils 8 --matrix 128 --seed $((30+i)) --threads 1
done; done
# stage 4 (experiments/shipping/configs/ship-synth-brain-more2.yaml): 12 more
i=0
for src in mni colin; do for ori in axial coronal sagittal; do
  i=$((i+1))
  varnet synth data/ship/train3 --source $src --orientation $ori --volumes 2 --slices 8 --coils 8 --matrix 128 --seed $((50+i)) --threads 1
done; done
varnet synth data/ship/val --source mni --orientation axial --volumes 1 --slices 8 --coils 8 --matrix 128 --seed 100 --threads 1
varnet synth data/ship/val --source colin --orientation coronal --volumes 1 --slices 8 --coils 8 --matrix 128 --seed 101 --threads 1
varnet synth data/ship/test --source mni --orientation axial --volumes 1 --slices 8 --coils 8 --matrix 128 --seed 200 --threads 1
varnet synth data/ship/test --source mni --orientation sagittal --volumes 1 --slices 8 --coils 8 --matrix 128 --seed 201 --threads 1
varnet synth data/ship/test --source colin --orientation axial --volumes 1 --slices 8 --coils 8 --matrix 128 --seed 202 --threads 1
varnet synth data/ship/test --source colin --orientation coronal --volumes 1 --slices 8 --coils 8 --matrix 128 --seed 203 --threads 1
echo done
