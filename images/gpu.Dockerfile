# syntax=docker/dockerfile:1
# profile-gpu and evaluation on a GPU host (compose services profile-gpu, evaluate-gpu): FP16 and
# GPTQ on CUDA, and the GGUF files through the same portable llama.cpp build as the cpu image, so
# `evaluate` scores every variant in one place. CUDA's `devel` flavour at run time for gptqmodel's
# just-in-time kernels, as in gptq.Dockerfile.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_VERSION=3.11.14
ARG LLAMA_CPP_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
ARG LLAMA_CPP_COMMIT
# the same portable llama.cpp as cpu.Dockerfile (see there)
ENV UV_PYTHON_INSTALL_DIR=/opt/python PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
COPY requirements/base.txt requirements/train.txt requirements/gptq.txt requirements/gguf.txt /src/requirements/
RUN /opt/venv/bin/pip install --no-binary llama-cpp-python \
      -r /src/requirements/gptq.txt -r /src/requirements/gguf.txt
COPY stages/lib/llama_cpp_tools.py /src/llama_cpp_tools.py
RUN /opt/venv/bin/python /src/llama_cpp_tools.py install \
 && test "$(cat /opt/venv/share/llama.cpp/COMMIT)" = "${LLAMA_CPP_COMMIT}"

FROM ${CUDA_IMAGE}
ARG PROJECT_VERSION=unknown
ARG LLAMA_CPP_COMMIT
LABEL org.opencontainers.image.title="cart-intent-gpu" \
      org.opencontainers.image.description="cart-intent SLM: GPU profiling and evaluation" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.llama-cpp.commit="${LLAMA_CPP_COMMIT}" \
      cart-intent.requirements="requirements/gptq.txt requirements/gguf.txt"
RUN apt-get update && apt-get install -y --no-install-recommends g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home app
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY images/sitecustomize.py /opt/venv/lib/python3.11/site-packages/sitecustomize.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.profile_gpu", "--help"]
