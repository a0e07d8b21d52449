# syntax=docker/dockerfile:1
# gptq: GPTQ 4-bit with gptqmodel on CUDA. The run-time stage keeps CUDA's `devel` flavour on
# purpose: gptqmodel compiles its CUDA kernels (Marlin, ExLlama) just in time with nvcc for the GPU
# it runs on, and triton builds its launcher with the C compiler; without them it falls back to
# slower kernels and the GPTQ speed would not be the paper's. Everything else stays in `build`.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_VERSION=3.11.14

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates build-essential \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
COPY requirements/base.txt requirements/train.txt requirements/gptq.txt /src/requirements/
RUN /opt/venv/bin/pip install -r /src/requirements/gptq.txt

FROM ${CUDA_IMAGE}
ARG PROJECT_VERSION=unknown
LABEL org.opencontainers.image.title="cart-intent-gptq" \
      org.opencontainers.image.description="cart-intent SLM: GPTQ quantization on CUDA" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.requirements="requirements/gptq.txt"
# g++ for the kernels compiled just in time (nvcc comes with the devel image).
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home app
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.gptq", "--help"]
