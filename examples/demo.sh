#!/usr/bin/env bash
# The whole product in one command, offline: trains three tiny Llama models, sweeps them at
# 16/8/4/3/2 bits with RTN (and GPTQ/AWQ at 4/3 bits), writes the report and its plots.
# Usage: bash examples/demo.sh [OUT_DIR] [extra demo flags, e.g. --sizes S,M --methods rtn]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-demo_out}"
shift || true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m lm_eval_quant.demo --out "${out}" "$@"
