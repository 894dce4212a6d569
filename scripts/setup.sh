#!/usr/bin/env bash
# Set-up shared by the two README commands: a virtualenv in .venv with the CPU build of torch
# first (so nothing can pull a multi-GB CUDA build), then this package with its extras.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.lmq-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) and lm-eval-quant[${LMQ_EXTRAS:-all}]"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[${LMQ_EXTRAS:-all}]"
  # hqq (the test oracle of method=hqq) ships as source only: build it without its CUDA extension
  DISABLE_CUDA=1 python -m pip install -q "hqq==0.2.8.post1" \
    || echo "[setup] hqq could not be installed: tests/test_hqq.py skips its oracle checks"
  touch "$stamp"
fi
