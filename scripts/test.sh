#!/usr/bin/env bash
# Install autoseg with the CPU build of torch into .venv and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# Pin the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# nnU-Net's network library, the reference of tests/test_network.py's ResEnc test. Without its dependencies:
# they include timm and torchvision, whose build fails beside the CPU torch; the networks it builds need neither.
python -m pip install --quiet --no-deps "dynamic-network-architectures==0.4.4"
# Lint first (pyproject.toml's [tool.ruff]): a few seconds, and it names the line to fix.
python -m ruff check .
python -m pytest -q "$@"
