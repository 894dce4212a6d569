#!/usr/bin/env bash
# The README's demo command: set-up from a fresh clone, then the whole product in one run:
# builds a family of tiny models offline, sweeps them over methods x bits, writes the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec lm-eval-quant demo --out "${1:-demo_out}"
