#!/usr/bin/env bash
# Install autoseg and run the whole pipeline on the bundled 20-case Hippocampus sample:
# plan, a short training of fold 0, predict the fold's validation cases, evaluate them.
# Takes a few minutes on a laptop CPU; the model is deliberately under-trained.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-sample_run}
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"   # CPU build; on a GPU machine install your CUDA torch instead
python -m pip install --quiet -e .
autoseg plan datasets/Hippocampus_sample -o "$WORK" --configs 3d_fullres --explain
autoseg train "$WORK" --fold 0 --epochs 2 --iters-per-epoch 10 --val-iters 3
autoseg predict "$WORK" -i datasets/Hippocampus_sample/imagesTr -o "$WORK/predictions" --folds 0
autoseg evaluate "$WORK/predictions" datasets/Hippocampus_sample/labelsTr
