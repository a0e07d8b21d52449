# Two images from one file, as llama.cpp's .devops files do:
#   cpu     gguf, evaluate and baseline on CPU, profile-cpu, loadtest, predict
#   server  the same image with serve as its command, a HEALTHCHECK on /health and port 8000 (make serve)
# llama.cpp is compiled from the pinned llama-cpp-python sdist for a portable x86-64 baseline: GGML_NATIVE off
# (no -march of the build host) and GGML_CPU_ALL_VARIANTS on (one CPU backend per x86-64 level, sse4.2 to
# AVX-512/AMX, the best one for the running CPU loaded at start by images/ggml_cpu_backend.py), so an image pulled
# onto another host benchmarks that host's CPU. torch is the CPU build of the pinned version from TORCH_INDEX_URL
# (empty: from the package index pip uses, which on PyPI is the larger CUDA build; BASE_IMAGES=debian does that).
# llama-server (serve's default engine) is compiled from the same sdist as one static binary for any x86-64-v3 CPU
# (AVX2, FMA, F16C), as `make venv` builds it; on arm64 pass --build-arg LLAMA_SERVER_CMAKE_ARGS=-DGGML_NATIVE=OFF.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# the llama.cpp commit of requirements/llama-cpp.json, for the label (images/tags.py passes it)
ARG LLAMA_CPP_COMMIT
ARG LLAMA_SERVER_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL
ARG PIP_INDEX_URL
ARG LLAMA_CPP_COMMIT
ARG LLAMA_SERVER_CMAKE_ARGS
# GGML_CPU_ALL_VARIANTS needs GGML_BACKEND_DL (each variant a loadable module); ggml installs those
# modules to CMAKE_INSTALL_BINDIR, pointed here at the package's own lib folder beside libggml.so.
# The host's CA bundle: see python.Dockerfile.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
# git: llama.cpp's build reads its commit from the sdist's git metadata (`llama-server --version`)
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
COPY requirements/base.txt requirements/train.txt requirements/gptq.txt requirements/gguf.txt \
     requirements/api.txt /src/requirements/
# The pinned torch from TORCH_INDEX_URL first (2.14.1+cpu satisfies torch==2.14.1), so the requirement files
# below find it installed and pull no CUDA libraries; llama-cpp-python from source.
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    python -m venv /opt/venv \
 && if [ -n "${TORCH_INDEX_URL}" ]; then /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" \
      "$(grep -o '^torch==[^ ]*' /src/requirements/train.txt)"; fi \
 && /opt/venv/bin/pip install --no-binary llama-cpp-python \
      -r /src/requirements/gguf.txt -r /src/requirements/gptq.txt -r /src/requirements/api.txt
# llama.cpp's converter and llama-server from the same sdist (as `make venv` does), and proof that it
# is the commit the image's label names.
COPY requirements/llama-cpp.json /src/requirements/
COPY scripts/llama_cpp_build.py /src/llama_cpp_build.py
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    /opt/venv/bin/python /src/llama_cpp_build.py install /src/requirements/llama-cpp.json "${LLAMA_SERVER_CMAKE_ARGS}"

FROM ${PYTHON_IMAGE} AS runtime
ARG PROJECT_VERSION=unknown
ARG LLAMA_CPP_COMMIT
LABEL org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.llama-cpp.commit="${LLAMA_CPP_COMMIT}" \
      cart-intent.requirements="requirements/gguf.txt requirements/gptq.txt requirements/api.txt"
# libgomp: llama.cpp and torch run their CPU threads on OpenMP. g++: gptqmodel compiles its CPU kernel just in
# time (cached in artifacts/.cache); without a compiler it falls back to a slower one.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 g++ \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home app
COPY --from=build /opt/venv /opt/venv
COPY images/ggml_cpu_backend.py images/ggml_cpu_backend.pth /opt/venv/lib/python3.11/site-packages/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY cart_intent/ /app/cart_intent/
COPY stages/ /app/stages/
USER app

FROM runtime AS cpu
LABEL org.opencontainers.image.title="cart-intent-cpu" \
      org.opencontainers.image.description="cart-intent SLM: GGUF, CPU evaluation and profiling"
CMD ["python", "-m", "stages.gguf", "--help"]

FROM runtime AS server
LABEL org.opencontainers.image.title="cart-intent-server" \
      org.opencontainers.image.description="cart-intent SLM: OpenAI-compatible API and /v1/intent on a GGUF"
# serve listens on every interface of the container; publish the port on the host's 127.0.0.1 (compose.yaml).
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
CMD ["python", "-m", "stages.serve", "--config", "configs/smollm2.toml", "--set", "serve.host=0.0.0.0"]
