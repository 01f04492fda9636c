# syntax=docker/dockerfile:1
#
# convserve images, one named target each:
#   docker build --target gateway  -t convserve-gateway  .   # the gRPC gateway: no torch
#   docker build --target triton   -t convserve-triton   .   # NGC Triton + the model repository
#   docker build --target exporter -t convserve-exporter .   # `convserve export` jobs (torch)
# A plain `docker build .` builds the gateway (the last stage).
#
# Base images are pinned by tag. Pin them by digest too where you build
# (`docker buildx imagetools inspect IMAGE` prints it, e.g. python:3.11.11-slim-bookworm@sha256:...):
# digests could not be resolved on the machine this file was written on.

# Python for the gateway and the exporter; 3.11 is the version the project tests on.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# Triton 2.51.0, the same release as the embedded Triton that the tests run (nvidia-pytriton 0.7.0).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

# ------------------------------------------------------------------------ python-base
# Shared by every Python stage, so the venv built below runs unchanged in the runtime stage.
FROM ${PYTHON_IMAGE} AS python-base
# No .pyc writes (the root filesystem is read-only in the chart), unbuffered logs, no pip cache in layers.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# One virtual environment that the runtime stage copies whole.
RUN python -m venv /opt/venv
# Build inputs go here; the gateway's runtime stage never sees this folder.
WORKDIR /src

# ------------------------------------------------------------------------------- deps
# Dependencies before code: this layer is rebuilt only when requirements-gateway.txt changes.
FROM python-base AS deps
# The pinned lock for the gateway, grpcio-tools (build only) included.
COPY requirements-gateway.txt ./
# Install the gateway's dependencies alone; the package itself comes later, with --no-deps.
RUN pip install -r requirements-gateway.txt

# ------------------------------------------------------------------------------ build
# Builds the package into the venv; this is the only stage that changes when code does.
FROM deps AS build
# The build inputs only: setup.py generates the protobuf code from protos/ at build time.
COPY pyproject.toml setup.py README.md ./
# The API contract that setup.py compiles.
COPY protos/ protos/
# The package source.
COPY service/ service/
# No build isolation: generate code with the pinned grpcio-tools from the layer above; then
# drop grpcio-tools, which only generates code, so the runtime image stays small.
RUN pip install --no-deps --no-build-isolation . \
    && pip uninstall --yes grpcio-tools

# --------------------------------------------------------------------------- exporter
# `convserve export` jobs: torch and torchvision, CPU builds (exporting needs no GPU).
FROM deps AS exporter
# CPU wheels: the default PyPI torch wheel pulls gigabytes of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# An unprivileged user; the repository to export into is a mounted volume.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin convserve
# torch 2.13.0 with its matching torchvision from the CPU index, then the exporter's other
# dependencies (ONNX export, safetensors checkpoints) from PyPI; all pinned as in the dev venv.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 torchvision==0.28.0 \
    && pip install onnx==1.23.2 onnxruntime==1.31.1 safetensors==0.8.0
# Code after the heavy dependency layers, so editing code does not reinstall torch.
COPY pyproject.toml setup.py README.md ./
# The API contract that setup.py compiles.
COPY protos/ protos/
# The package source.
COPY service/ service/
# Install the package without touching the pinned dependencies above.
RUN pip install --no-deps --no-build-isolation .
# Writes into /models (mount the model repository there).
ENV CONVSERVE_MODEL_REPOSITORY=/models
# Run as the unprivileged user (numeric, so Kubernetes can verify runAsNonRoot).
USER 10001:10001
# /work is where a job's checkpoints are mounted.
WORKDIR /work
# e.g. docker run -v $PWD/model_repository:/models convserve-exporter resnet50 --weights /work/r50.pth
ENTRYPOINT ["convserve", "export"]

# ----------------------------------------------------------------------------- triton
# Production Triton: the NGC image with the libtorch, onnxruntime and tensorrt backends.
FROM ${TRITON_IMAGE} AS triton
# Which folder of the build context to bake in; the default (the repo's model_repository/,
# only a README when nothing was exported) leaves /models for a mounted volume.
ARG MODEL_REPOSITORY=model_repository
# Bake the model repository in (chart value modelRepository.source=image); a volume mounted
# at /models replaces it (source=pvc or s3). Owned by Triton's non-root user.
COPY --chown=1000:1000 ${MODEL_REPOSITORY}/ /models/
# HTTP (health probes), gRPC (the gateway) and metrics (Prometheus).
EXPOSE 8000 8001 8002
# The NGC image's unprivileged triton-server user (uid 1000), numeric for runAsNonRoot.
USER 1000:1000
# config.pbtxt (KIND_AUTO) is the production profile; readiness only when every model loaded;
# on SIGTERM, finish calls in flight for up to 30 s (below the chart's grace period).
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", \
     "--exit-timeout-secs=30", "--log-verbose=0"]

# ---------------------------------------------------------------------------- gateway
# The gateway: slim Python, the venv from `build`, no compilers, no torch.
FROM python-base AS gateway
# An unprivileged user with a fixed uid (the chart's securityContext runs as it).
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin convserve
# Only the built venv: dependencies and the package, not the source tree.
COPY --from=build /opt/venv /opt/venv
# Run from an empty folder: the gateway needs no model repository on disk.
WORKDIR /home/convserve
# gRPC API and Prometheus /metrics.
EXPOSE 50051 9464
# Run as the unprivileged user (numeric, so Kubernetes can verify runAsNonRoot).
USER 10001:10001
# Liveness over grpc.health.v1 (service "liveness": the gateway itself, whatever Triton does);
# Kubernetes uses its own native gRPC probes from the chart instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('CONVSERVE_GRPC_PORT', '50051')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(service='liveness'), timeout=4); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]
# Settings come from CONVSERVE_* variables (the chart's ConfigMap); SIGTERM drains.
ENTRYPOINT ["convserve", "gateway"]
