# syntax=docker/dockerfile:1
# genq worker image: `genq worker --tool NAME` with the `ml` extra (diffusers, spandrel)
# and CUDA-ready torch. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t genq-worker .
# torch and torchvision come from the PyTorch CUDA index (TORCH_INDEX_URL): their wheels
# carry the CUDA runtime libraries, so the base is a plain slim Python and the GPU driver
# comes from the node (NVIDIA container toolkit / GPU operator). Pick the index whose CUDA
# version the nodes' driver supports, e.g. .../whl/cu126 for older drivers, or
# .../whl/cpu for a CPU-only image.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# -- build ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# EXTRAS: genq's optional dependency groups, comma-separated. `ml` (the default) is the
# GPU worker; EXTRAS="" builds a small worker without torch (python tools and the Lanczos
# upscale only), which is what the project's real-node tests run.
ARG EXTRAS=ml
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/genq
COPY pyproject.toml ./
# 1. torch and torchvision, at pyproject's pins, from the CUDA index only (no fallback to
#    PyPI's build); 2. the rest of the dependencies and the extras from PyPI, with torch
#    already satisfied.
RUN EXTRAS="${EXTRAS}" python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in os.environ['EXTRAS'].split(',') if e]; print('\n'.join(p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]))" > requirements.txt \
 && { grep -E '^(torch|torchvision)==' requirements.txt > torch.txt || true; } \
 && if [ -s torch.txt ]; then /opt/genq/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r torch.txt; fi \
 && /opt/genq/bin/pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY src ./src
COPY api ./api
COPY operator ./operator
COPY worker ./worker
RUN /opt/genq/bin/pip install --no-cache-dir --no-deps .

# -- runtime ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="genq-worker" \
      org.opencontainers.image.description="genq worker with the ML stack (diffusers, CUDA torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 genq \
 && useradd --system --uid 10001 --gid genq --home-dir /home/genq --create-home --shell /usr/sbin/nologin genq \
 && install -d -o 10001 -g 10001 /var/cache/genq
COPY --from=build /opt/genq /opt/genq
# Downloaded models (Hugging Face) and converted weights land in /var/cache/genq: mount a
# volume there (or set the pool's options.cacheDir) to keep them across restarts.
ENV PATH=/opt/genq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/genq/huggingface \
    XDG_CACHE_HOME=/var/cache/genq \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GENQ_STORE=kubernetes \
    GENQ_WORKER_HEALTH_PORT=8081
WORKDIR /home/genq
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["genq"]
CMD ["worker", "--help"]
