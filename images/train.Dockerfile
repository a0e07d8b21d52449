# syntax=docker/dockerfile:1
# base, finetune, merge (QLoRA with bitsandbytes on CUDA). torch's wheels bring their own CUDA 13
# libraries, so the run-time image is CUDA's small `base` flavour; the driver comes from the host
# (NVIDIA Container Toolkit). Python is the same 3.11 as the slim images, installed by uv.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_VERSION=3.11.14

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
COPY requirements/base.txt requirements/train.txt /src/requirements/
RUN /opt/venv/bin/pip install -r /src/requirements/train.txt

FROM ${CUDA_IMAGE}
ARG PROJECT_VERSION=unknown
LABEL org.opencontainers.image.title="cart-intent-train" \
      org.opencontainers.image.description="cart-intent SLM: base, finetune, merge on CUDA" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.requirements="requirements/train.txt"
RUN useradd --uid 10001 --create-home app
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.finetune", "--help"]
