#!/usr/bin/env bash
# The README's demo command: set-up from a fresh clone, then the whole product in one run:
# builds a family of tiny models offline, sweeps them over methods x bits, writes the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# usage: bash scripts/demo.sh [OUT_DIR] [demo flags, e.g. --sizes S,M --methods rtn]
out="${1:-demo_out}"
shift || true
exec lm-eval-quant demo --out "$out" "$@"
