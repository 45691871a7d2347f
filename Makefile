# The two commands: `make serve` (ViT-g/14 from deploy/) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_MODEL := .dev-model/tiny-clip
# Ray's own settings for serving (Ray Serve's throughput mode behind HAProxy): see deploy/ray-serve.env.
# On one machine no load balancer needs the 30 s drain of a stopping ingress replica: Ctrl-C then takes
# ~8 s instead of ~33 s (BENCHMARKS.md, "Stopping").
SERVE := env $(shell grep -E '^[A-Z_]+=' deploy/ray-serve.env) RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2 \
	$(VENV)/bin/serve

.PHONY: install fetch-vitg serve serve-dev serve-gpu test clean

install: $(STAMP)

# Everything comes from the package registry (torch/torchvision from this machine's pip cache/disk when present).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Fetches the default ViT-g/14 into the Hugging Face cache first, so that no network fails fast and clearly.
fetch-vitg: install
	@$(PY) -m serve_app.modeling hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K || { \
	  echo "make serve: cannot fetch the ViT-g/14 weights from the Hugging Face hub (offline?)." >&2; \
	  echo "Try 'make serve-dev': a tiny random model that needs no download." >&2; exit 1; }

# Serves the default ViT-g/14 on the CPU (fp32), or on a GPU (bf16).
serve: fetch-vitg
	$(SERVE) run deploy/local-cpu.yaml

serve-gpu: fetch-vitg
	$(SERVE) run deploy/local-gpu.yaml

# A tiny random model written on the fly: fully offline, for trying the API.
serve-dev: install
	test -f $(DEV_MODEL)/open_clip_config.json || $(PY) -m serve_app.dev_model $(DEV_MODEL)
	$(SERVE) run deploy/dev.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .dev-model .pytest_cache
