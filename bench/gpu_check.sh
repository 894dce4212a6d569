#!/usr/bin/env bash
# GPU check (issue 14): GPTQ layer-wise on CUDA, RTN, fake vs real-kernel throughput, vLLM on an
# export if installed. Random-initialised 1B / 7B Llama shapes, nothing downloaded, ≤ 8 min on one
# GPU; prints one table.  --dry-run: tiny shapes on CPU (no GPU needed).
#   bash bench/gpu_check.sh [--dry-run] [--shapes 1b 7b] [--json out.json] [--no-vllm]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" "$here/gpu_check.py" "$@"
