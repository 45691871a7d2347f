# The two commands: `make serve` (ViT-g/14 from deploy/) and `make test`; `make services` first, once, for the
# Redis and PostgreSQL binaries the tests start servers from.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_MODEL := .dev-model/tiny-clip
# Ray's environment comes from deploy/*.env through one reader (serve_app/ray_env.py): the serving env on
# every box, plus the small-CPU tuning on CPU-only ones.
SERVE_CPU := $(PY) -m serve_app.ray_env --small-cpu -- $(VENV)/bin/serve
SERVE_GPU := $(PY) -m serve_app.ray_env -- $(VENV)/bin/serve

.PHONY: install services fetch-vitg serve serve-dev serve-gpu test clean

install: $(STAMP)

# Everything comes from the package registry (torch/torchvision from this machine's pip cache/disk when present).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Debian's redis-server and postgresql, when missing (needs root, or sudo): the tests start servers of their own
# from them (tests/services.py); nothing is started or enabled at boot. CI's .ci/run does the same.
services:
	@tests/install-services.sh

# Fetches the default ViT-g/14 into the Hugging Face cache first, so that no network fails fast and clearly.
fetch-vitg: install
	@$(PY) -m serve_app.modeling hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K || { \
	  echo "make serve: cannot fetch the ViT-g/14 weights from the Hugging Face hub (offline?)." >&2; \
	  echo "Try 'make serve-dev': a tiny random model that needs no download." >&2; exit 1; }

# Serves the default ViT-g/14 on the CPU (fp32), or on a GPU (bf16).
serve: fetch-vitg
	$(SERVE_CPU) run deploy/local-cpu.yaml

serve-gpu: fetch-vitg
	$(SERVE_GPU) run deploy/local-gpu.yaml

# A tiny random model written on the fly: fully offline, for trying the API.
serve-dev: install
	test -f $(DEV_MODEL)/open_clip_config.json || $(PY) -m serve_app.dev_model $(DEV_MODEL)
	$(SERVE_CPU) run deploy/dev.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .dev-model .pytest_cache
