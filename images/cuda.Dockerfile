# syntax=docker/dockerfile:1
# The CUDA images, one build target each (as llama.cpp's .devops files do):
#   train  base, finetune, merge (QLoRA with bitsandbytes). torch's wheels bring their own CUDA 13 libraries,
#          so it runs on CUDA's small `base` flavour; the driver comes from the host (NVIDIA Container Toolkit).
#   gptq   GPTQ 4-bit with gptqmodel. Keeps CUDA's `devel` flavour at run time on purpose: gptqmodel compiles
#          its CUDA kernels (Marlin, ExLlama) just in time with nvcc for the GPU it runs on, and triton builds
#          its launcher with the C compiler; without them it falls back to slower kernels.
#   gpu    profile-gpu and evaluation on a GPU host (services profile-gpu, evaluate-gpu): FP16 and GPTQ on
#          CUDA, and the GGUF files through the same portable llama.cpp build as the cpu image, so `evaluate`
#          scores every variant in one place. `devel` at run time for gptqmodel, as gptq.
# Python is the same 3.11 as the slim images, installed by uv; each target builds its venv in its own stage.
#   docker build -f images/cuda.Dockerfile --target gptq .      (make images builds all three, tagged)
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_VERSION=3.11.14
ARG LLAMA_CPP_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f

FROM ${UV_IMAGE} AS uv

# ---- build stages: an interpreter and a venv per target ------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS python
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

FROM python AS train-build
COPY requirements/base.txt requirements/train.txt /src/requirements/
RUN /opt/venv/bin/pip install -r /src/requirements/train.txt

FROM python AS gptq-build
COPY requirements/base.txt requirements/train.txt requirements/gptq.txt /src/requirements/
RUN /opt/venv/bin/pip install -r /src/requirements/gptq.txt

FROM python AS gpu-build
ARG LLAMA_CPP_COMMIT
# the same portable llama.cpp as cpu.Dockerfile (see there)
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
COPY requirements/base.txt requirements/train.txt requirements/gptq.txt requirements/gguf.txt /src/requirements/
RUN /opt/venv/bin/pip install --no-binary llama-cpp-python \
      -r /src/requirements/gptq.txt -r /src/requirements/gguf.txt
COPY stages/lib/llama_cpp_tools.py /src/llama_cpp_tools.py
RUN /opt/venv/bin/python /src/llama_cpp_tools.py install \
 && test "$(cat /opt/venv/share/llama.cpp/COMMIT)" = "${LLAMA_CPP_COMMIT}"

# ---- run-time targets -----------------------------------------------------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS train
ARG PROJECT_VERSION=unknown
LABEL org.opencontainers.image.title="cart-intent-train" \
      org.opencontainers.image.description="cart-intent SLM: base, finetune, merge on CUDA" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.requirements="requirements/train.txt"
RUN useradd --uid 10001 --create-home app
COPY --from=train-build /opt/python /opt/python
COPY --from=train-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.finetune", "--help"]

FROM ${CUDA_DEVEL_IMAGE} AS gptq
ARG PROJECT_VERSION=unknown
LABEL org.opencontainers.image.title="cart-intent-gptq" \
      org.opencontainers.image.description="cart-intent SLM: GPTQ quantization on CUDA" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.requirements="requirements/gptq.txt"
# g++ for the kernels compiled just in time (nvcc comes with the devel image).
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home app
COPY --from=gptq-build /opt/python /opt/python
COPY --from=gptq-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.gptq", "--help"]

FROM ${CUDA_DEVEL_IMAGE} AS gpu
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
COPY --from=gpu-build /opt/python /opt/python
COPY --from=gpu-build /opt/venv /opt/venv
COPY images/sitecustomize.py /opt/venv/lib/python3.11/site-packages/sitecustomize.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.profile_gpu", "--help"]
