#!/usr/bin/env bash
# Create .venv (Python >= 3.10; CI uses 3.11) with the deliberate pins of requirements/ci.txt.
# nnunetv2 and dynamic-network-architectures go in with --no-deps: their timm -> torchvision
# chain would replace the CPU torch 2.13.0 with a multi-GB CUDA build, and the 2D U-Nets
# used here never import timm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements/ci.txt
.venv/bin/python -m pip install --quiet --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, nnunetv2, L3MuscleSegLib; print('torch', torch.__version__)"
