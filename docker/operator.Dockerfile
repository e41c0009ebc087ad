# syntax=docker/dockerfile:1
# genq operator image: `genq operator` (kopf handlers + housekeeping), no ML stack. Build from the
# repository root:  docker build -f docker/operator.Dockerfile -t genq-operator .
# docker/api.Dockerfile is the same install with `genq api` as its command.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# -- build: a virtualenv with genq's dependencies, then genq itself ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/genq
# Dependencies first (read from pyproject.toml), so a source change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /opt/genq/bin/pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY src ./src
COPY api ./api
COPY operator ./operator
COPY worker ./worker
RUN /opt/genq/bin/pip install --no-cache-dir --no-deps .

# -- runtime: the virtualenv only, as an unprivileged user --------------------------------
FROM ${PYTHON_IMAGE}
# Who owns the installed code: root, so the app cannot change it; the Tiltfile builds
# dev images with 10001 so live_update can sync sources into site-packages.
ARG CODE_OWNER=root
LABEL org.opencontainers.image.title="genq-operator" \
      org.opencontainers.image.description="genq operator (cluster mode)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 genq \
 && useradd --system --uid 10001 --gid genq --home-dir /home/genq --create-home --shell /usr/sbin/nologin genq
COPY --from=build --chown=${CODE_OWNER} /opt/genq /opt/genq
ENV PATH=/opt/genq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GENQ_STORE=kubernetes
# Never the source tree: a top-level operator/ folder would shadow the stdlib module.
WORKDIR /home/genq
USER 10001:10001
ENTRYPOINT ["genq"]
CMD ["operator"]
