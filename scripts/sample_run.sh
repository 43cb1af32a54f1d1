#!/usr/bin/env bash
# Install autoseg and run the whole pipeline on the bundled 20-case Hippocampus sample:
# plan, a short training of fold 0 (250 iterations; the held-out Dice it prints at the end is
# about 0.8 per label), predict all 20 images with it, evaluate them against their labels
# (16 of the 20 were training cases, so that last Dice is optimistic).
# About 4 minutes on a 2-core CPU, most of it installing.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-sample_run}
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"   # CPU build; on a GPU machine install your CUDA torch instead
python -m pip install --quiet -e .
autoseg plan datasets/Hippocampus_sample -o "$WORK" --configs 3d_fullres --explain
autoseg train "$WORK" --fold 0 --epochs 5 --iters-per-epoch 50 --val-iters 3
autoseg predict "$WORK" -i datasets/Hippocampus_sample/imagesTr -o "$WORK/predictions" --folds 0
autoseg evaluate "$WORK/predictions" datasets/Hippocampus_sample/labelsTr
