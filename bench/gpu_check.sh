#!/usr/bin/env bash
# The GPU figures for packed reward scoring, in one short run (< 10 minutes on an H100/H200).
#
#   bash bench/gpu_check.sh            # writes logs, JSON and PNGs to $OUT (or runs/gpu-check/)
#
# Needs python3 with torch (CUDA), transformers, tokenizers, httpx, tqdm; pytest for step 1;
# nothing downloaded. The HTTP figures also need the service's packages (fastapi, uvicorn,
# pydantic, pydantic-settings, prometheus-client): where they are missing the bench says so and
# skips HTTP. On a machine without internet, carry them as wheels in .whl/ (pip download
# --no-deps --only-binary=:all: fastapi starlette pydantic pydantic-core pydantic-settings
# python-dotenv annotated-types typing-inspection uvicorn, for that machine's Python); this
# script installs .whl/*.whl into /tmp/site when the folder exists.
# Every step has its own timeout and prints each figure as soon as it is measured, so a step
# cut short still leaves what it measured in its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-runs/gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT_DIR/NAME.log, never stop the script
    local name=$1 secs=$2; shift 2
    echo "=== $name (timeout ${secs}s): $*"
    timeout --signal=INT --kill-after=10 "$secs" "$@" 2>&1 | grep --line-buffered -v "Writing model shards" | tee "$OUT_DIR/$name.log"
    echo "=== $name exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

# 1. Exactness on the GPU: FlexAttention BlockMask (and compiled) packed == alone in fp32; bf16 bound;
#    packing=auto falls back to padded batches for a model it cannot serve.
step tests 60 $PY -m pytest -q -x -p no:cacheprovider tests/test_packing_forward.py -k cuda
# 2. 8B in process: per-request, padded-sorted, packed (flex), packed + compile (one bucket: one compile).
step bench-8b 190 $PY bench/reward_gpu.py --size 8b --device cuda --modes per_request,sorted,packed,packed_compile \
    --buckets 1 --json "$OUT_DIR/reward_gpu_8b.json" --plot "$OUT_DIR/reward_gpu_8b.png"
# 3. 1B, every mode; HTTP with 64 clients through reward_pref --packing on, then --packing on --compile.
step bench-1b 180 $PY bench/reward_gpu.py --size 1b --device cuda --compile --buckets 1 \
    --json "$OUT_DIR/reward_gpu_1b.json" --plot "$OUT_DIR/reward_gpu_1b.png"
# 4. 8B through HTTP: reward_pref --packing on --compile (flex, rows of 32768, one bucket), the
#    figure users get; packed in process alongside for the http_compile_vs_packed_compile ratio.
step bench-8b-http 150 $PY bench/reward_gpu.py --size 8b --device cuda --modes packed_compile,http_compile --buckets 1
grep -h "^RESULT" "$OUT_DIR"/bench-*.log
