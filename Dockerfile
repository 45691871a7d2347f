# The serving image: Ray 2.60's GPU image (CUDA, Python 3.11, user `ray`, uid 1000) plus this project,
# without dev or test extras. KubeRay runs `ray start` in it; the Serve app comes from serveConfigV2.
#
#   docker build -t clip-serve:0.1.0-gpu .
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu -t clip-serve:0.1.0-cpu .
#
# No weights inside by default: the pods read them from the Hugging Face cache volume (k8s/base/weights.yaml).
# To bake a model in instead (a self-contained image, ~5.5 GB larger for ViT-g/14), name it at build time:
#
#   docker build --build-arg BAKE_MODEL=hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K -t clip-serve:0.1.0-vitg .
#   (a built-in name also takes BAKE_PRETRAINED, e.g. BAKE_MODEL=ViT-B-32 BAKE_PRETRAINED=laion2b_s34b_b79k)
#
# and drop the cache volume, its init container and HF_HOME from the RayService (keep HF_HUB_OFFLINE=1).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

ARG BAKE_MODEL=""
ARG BAKE_PRETRAINED=""

USER root
WORKDIR /opt/clip
COPY pyproject.toml README.md constraints.txt ./
COPY serve_app ./serve_app
# Not editable, no extras: the service's own dependencies only (ray[serve] matches the base image's Ray, which
# constraints.txt leaves alone). `-c constraints.txt`: torch and torchvision at the versions the project is
# built and tested with, as `make install` pins them, not whatever is newest on the day of the build. The Ray
# base images carry no torch of their own, so the pin fights nothing there; on a base image that does, pip
# replaces it with the pinned one (or fails on a conflict) rather than mixing versions.
RUN python -m pip install --no-cache-dir -c constraints.txt . && rm -rf /opt/clip/build \
    && { [ -e /usr/local/bin/clip-haproxy ] || ln -s "$(command -v clip-haproxy)" /usr/local/bin/clip-haproxy; }
# Ray starts HAProxy through this wrapper: splice off, so that clients that hang up are seen (serve_app/haproxy.py).
ENV RAY_SERVE_HAPROXY_BINARY_PATH=/usr/local/bin/clip-haproxy

USER 1000:100
WORKDIR /home/ray
ENV HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0
RUN if [ -n "$BAKE_MODEL" ]; then \
      python -m serve_app.modeling "$BAKE_MODEL" ${BAKE_PRETRAINED:+--pretrained "$BAKE_PRETRAINED"}; \
    fi
