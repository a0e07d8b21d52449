# Cart-intent SLM pipeline: each stage is `python -m stages.<name>` over artifacts/<run>/.
#   make all                     whole chain on the embedded tiny config (sets up .venv first)
#   make test                    unit + integration tests
#   make generate CONFIG=configs/smoke.toml SET="generate.n_examples=300" FORCE=1

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/tiny.toml
SET ?=
FORCE ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SET_ARGS := $(foreach s,$(SET),--set $(s))
STAGE = $(PY) -m stages.$(1) --config $(CONFIG) $(SET_ARGS)
export FORCE

.DEFAULT_GOAL := help
.PHONY: help all generate base finetune merge gptq gguf baseline evaluate profile-cpu profile-gpu report test test-unit clean venv

## Show this help
help:
	@awk 'BEGIN {FS = ":.*"} /^## / {desc = substr($$0, 4); next} /^[a-zA-Z_-]+:/ && desc {printf "  \033[36m%-12s\033[0m %s\n", $$1, desc; desc = ""}' $(MAKEFILE_LIST)
	@echo "  Variables: CONFIG=$(CONFIG)  SET=\"section.key=value ...\"  FORCE=1"

$(STAMP): requirements/*.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements/all.txt
	$(PY) -m stages.lib.llama_cpp_tools install
	touch $@

## Create .venv from the pinned requirements (done automatically by every target)
venv: $(STAMP)

## Run every stage in order on CONFIG (default: the embedded tiny model)
all: report

## Generate the synthetic en/hr/es dataset -> artifacts/<run>/data/
generate: $(STAMP)
	$(call STAGE,generate)

## Prepare the base model(s): tiny (trained here), shape twin, or HF -> artifacts/<run>/base/
base: generate
	$(call STAGE,base)

## QLoRA fine-tune each base model (resumes after an interrupt) -> artifacts/<run>/finetune/
finetune: base
	$(call STAGE,finetune)

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

## Exact match of every variant (FP16, GPTQ, GGUF), free and constrained -> artifacts/<run>/eval/
evaluate: gptq gguf
	$(call STAGE,evaluate)

## CPU cost of each GGUF variant (fresh process each; naive vs prefix-cached) -> artifacts/<run>/profiles/<host>/cpu/
profile-cpu: gguf
	$(call STAGE,profile_cpu)

## GPU cost of FP16 vs GPTQ (NVML VRAM and energy); skipped without CUDA -> artifacts/<run>/profiles/<host>/gpu/
profile-gpu: gptq
	$(call STAGE,profile_gpu)

## Tables and figures next to the paper's numbers, every host merged -> artifacts/<run>/report/
report: evaluate baseline profile-cpu profile-gpu
	$(call STAGE,report)

## Run unit and integration tests (sets up .venv first)
test: $(STAMP)
	$(PY) -m pytest -m "integration or not integration" $(PYTEST_ARGS)

## Run the fast unit tests only
test-unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Remove artifacts/<run> of CONFIG (keeps .venv)
clean:
	$(PYTHON) -c "import shutil,tomllib,sys; c=tomllib.load(open('$(CONFIG)','rb')).get('run',{}); shutil.rmtree(c.get('artifacts_dir','artifacts')+'/'+c.get('name','tiny'), ignore_errors=True)"
