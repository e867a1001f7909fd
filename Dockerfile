# syntax=docker/dockerfile:1
# spo images for Prefect docker / kubernetes work pools (deploy/prefect-docker.yaml, deploy/prefect-kubernetes.yaml).
#   docker build --target gpu -t your-registry/spo:gpu .   # CUDA torch + DeepSpeed + NVML + HPSv2.1: GPU stages
#   docker build --target cpu -t your-registry/spo:cpu .   # CPU torch: synth, prepare, register, promote, the flow
# The project root (data/, models/, checkpoints/, reports/, .spo/) is a shared volume mounted at /data/spo;
# the image holds the code only. Hub downloads go to /data/hf (HF_HOME) on the same volume.

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS cpu
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# git: DVC and lineage tags read the checkout; libgl/libglib: none needed (PIL, no OpenCV).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.* \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 spo && mkdir -p /opt/spo /data/spo /data/hf && chown -R spo /opt/spo /data
WORKDIR /opt/spo
COPY --chown=spo pyproject.toml README.md ./
COPY --chown=spo scripts ./scripts
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY --chown=spo spo ./spo
COPY --chown=spo flows ./flows
COPY --chown=spo configs ./configs
COPY --chown=spo sweeps ./sweeps
COPY --chown=spo prefect.yaml dvc.yaml params.yaml ./
RUN pip install -e .
USER 1000
CMD ["spo", "--help"]

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* python3-dev=3.12.* git=1:2.* \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# Ubuntu 24.04 ships uid 1000 as "ubuntu": reuse the uid under our name.
RUN userdel --remove ubuntu 2>/dev/null; useradd --create-home --uid 1000 spo \
    && mkdir -p /opt/spo /data/spo /data/hf && chown -R spo /opt/spo /data /opt/venv
WORKDIR /opt/spo
COPY --chown=spo pyproject.toml README.md ./
COPY --chown=spo scripts ./scripts
# PyPI's Linux torch wheel is the CUDA build; the metrics extra then gets the matching torchvision.
RUN pip install "torch==${TORCH_VERSION}"
COPY --chown=spo spo ./spo
COPY --chown=spo flows ./flows
COPY --chown=spo configs ./configs
COPY --chown=spo sweeps ./sweeps
COPY --chown=spo prefect.yaml dvc.yaml params.yaml ./
RUN pip install -e ".[gpu]" && bash scripts/install_metrics.sh /opt/venv/bin/pip .
USER 1000
CMD ["spo", "--help"]
