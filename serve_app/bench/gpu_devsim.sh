#!/usr/bin/env bash
# Rehearses the GPU run on this CPU machine in an environment like the lent GPU machine's: a fresh Python 3.12
# virtualenv holding only packages that the device image has (per the device tool's KINDS.md), plus
# .gpu-carry/ (build it first: bash serve_app/bench/gpu_carry.sh --served), and nothing from .venv.
# A missing dependency of the carried Ray Serve shows up here instead of in the one device run a session gets.
#
#   bash serve_app/bench/gpu_devsim.sh        # then read /tmp/devsim-out/gpu.log: "served ..." must have a number
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${DEVSIM_VENV:-/tmp/devsim}
PY312=${PY312:-$(command -v python3.12 || true)}
# A pyenv shim for a version that is installed but not selected fails when run: take the install itself.
if ! "$PY312" -V >/dev/null 2>&1 && command -v pyenv >/dev/null; then
  PY312=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
fi
[[ -d .gpu-carry/whl ]] || { echo "no .gpu-carry: run bash serve_app/bench/gpu_carry.sh --served first" >&2; exit 1; }
if [[ ! -x "$VENV/bin/python3" ]]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  # a subset of the device image's packages: those any of ours, Ray's or open_clip's imports could reach
  "$VENV/bin/pip" install -q numpy pillow httpx tqdm matplotlib pyyaml requests huggingface-hub safetensors timm \
    regex protobuf psutil grpcio aiohttp prometheus-client uvloop msgpack click filelock packaging jinja2 \
    typing-extensions fsspec attrs anyio cloudpickle tokenizers sentencepiece rich typer pandas scipy six \
    aiofiles annotated-doc certifi charset-normalizer colorama h11 httpcore idna markupsafe networkx pyarrow \
    pygments pyparsing python-dateutil setuptools sympy threadpoolctl urllib3 werkzeug wrapt zipp
fi
rm -rf /tmp/site /tmp/devsim-out
env -i HOME="$HOME" PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" OUT=/tmp/devsim-out \
  bash serve_app/bench/gpu_run.sh --smoke "$@"
