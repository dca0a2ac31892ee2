#!/usr/bin/env bash
# Issue 5's GPU targets in one device call: the engine in-process against HF generate on a random
# Qwen2-0.5B architecture in bf16 (one stream >= 1,500 tok/s; >= 20,000 output tok/s at 256 at once).
# Needs only the device image's torch and transformers (lmsmith runs from src/). Writes $OUT/engine_gpu.json;
# the table is the last thing printed. Takes a few minutes: model build, warm-up (graph capture), runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp}"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv || true
python3 bench/engine_bench.py --preset gpu --json-out "$OUT/engine_gpu.json" > "$OUT/engine_gpu.log" 2>&1 || { tail -40 "$OUT/engine_gpu.log"; exit 1; }
grep -v '^ \|^{\|^}' "$OUT/engine_gpu.log" | tail -8
