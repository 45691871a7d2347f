#!/usr/bin/env bash
# The one prepared command for the lent GPU machine (device tool, carry [".gpu-carry"]), ≤ 8 minutes:
#   bash serve_app/bench/gpu_run.sh [extra clip-bench gpu options]
# Installs what .gpu-carry/ holds (see gpu_carry.sh) into /tmp/site, then runs `clip-bench gpu` with a
# 7-minute budget; JSON and the Markdown table land in $OUT (or bench-out/ when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-bench-out}
mkdir -p "$OUT_DIR" /tmp/site
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
if [[ -d .gpu-carry/whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-carry/whl/*.whl || exit 1
fi
if [[ -f .gpu-carry/ray-2.60.0-trimmed.tar.xz ]]; then
  tar -C /tmp/site -xJf .gpu-carry/ray-2.60.0-trimmed.tar.xz || exit 1
  chmod +x /tmp/site/ray/core/src/ray/raylet/raylet /tmp/site/ray/core/src/ray/gcs/gcs_server 2>/dev/null
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
timeout 470 python3 -m serve_app.bench gpu --budget 400 --out "$OUT_DIR/gpu.json" "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
