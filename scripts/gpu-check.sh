#!/usr/bin/env bash
# The GPU checks in one run on a host with an NVIDIA GPU, no package index needed (sized for 8 minutes on one
# GPU; gptqmodel compiles its CUDA kernels on the first run, cached in artifacts/.cache/gptqmodel-ext):
#   1. the host's python (PYTHON=python3) with its own torch and transformers (requirements/gpu-host.lock's
#      `# host:` line); only the pins it lacks are installed, from gpu-wheels/ (`make gpu-wheels`, made on a
#      connected machine and copied into this checkout) into GPU_SITE, with pip --no-index: never a download;
#   2. without a CUDA device: one line, exit 0;
#   3. the smoke run up to GPTQ (tiny model), profile-gpu FP16 / GPTQ / NF4 on it and on the Llama 3.2 1B shape
#      twin, and the QLoRA step time on CUDA on the shape twin (scripts/bench_finetune.py).
# A variant that cannot run here (gptqmodel or bitsandbytes not importable, a failed or timed-out step) is
# skipped with its reason. Every result is JSON in RESULTS (summary.json holds them all), printed at the end.
#   scripts/gpu-check.sh                 REQUESTS=20 (100 for the full profile), RESULTS=artifacts/gpu-check
#   PYTHON=/opt/py/bin/python3 GPU_WHEELS=gpu-wheels GPU_SITE=/tmp/cart-intent-gpu-site STEP_TIMEOUT=420 scripts/gpu-check.sh
# Exit codes: 0 done (failed and skipped steps are in steps.json), 1 pip failed, 2 the host python lacks what
# the lock's `# host:` line needs, 3 the wheel folder is missing, incomplete or altered.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REQUESTS=${REQUESTS:-20}
RESULTS=${RESULTS:-artifacts/gpu-check}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/cart-intent-gpu-site}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1       # whatever pip.conf says: no index
export GPTQMODEL_TORCH_EXTENSIONS_DIR=${GPTQMODEL_TORCH_EXTENSIONS_DIR:-$PWD/artifacts/.cache/gptqmodel-ext}
export PYTHONUNBUFFERED=1
helper() { "$PYTHON" scripts/gpu_host.py "$@"; }

rm -f "$RESULTS"/*.json
helper install --lock "${GPU_LOCK:-requirements/gpu-host.lock}" --wheels "${GPU_WHEELS:-gpu-wheels}" --site "$SITE" \
  --results "$RESULTS" || exit $?
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! gpu=$(helper cuda 2>/dev/null); then
  helper skip --results "$RESULTS" gpu "$gpu"
  echo "gpu-check: GPU steps skipped: $gpu"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader >&2

step() {   # step NAME COMMAND...: under STEP_TIMEOUT; its exit status and seconds go to steps.json
  local name=$1 began=$SECONDS rc
  shift
  echo "== $name" >&2
  timeout "$STEP_TIMEOUT" "$@"
  rc=$?
  helper record --results "$RESULTS" "$name" "$rc" "$((SECONDS - began))"
  return "$rc"
}
skip() { helper skip --results "$RESULTS" "$1" "$2"; echo "gpu-check: $1 skipped: $2" >&2; }
stage() { local run=$1 name=$2; shift 2; step "$run $name" "$PYTHON" -m "stages.$name" --config "configs/$run.toml" "$@"; }

available=(fp16)
if why=$(helper importable gptqmodel); then available+=(gptq); else skip gptq "gptqmodel does not import: $why"; fi
if why=$(helper importable bitsandbytes); then available+=(nf4); else skip nf4 "bitsandbytes does not import: $why"; fi
nf4() { [[ " ${available[*]} " == *" nf4 "* ]]; }

profile() {   # profile RUN VARIANT...: all in one profile-gpu run; if that fails, each variant alone
  local run=$1 list
  shift
  list=$(printf '"%s",' "$@")
  if stage "$run" profile_gpu --set "profile_gpu.variants=[${list%,}]" --set "profile_gpu.requests=$REQUESTS"; then
    cp "$(ls -t artifacts/"$run"/profiles/*/gpu/results.json | head -1)" "$RESULTS/profile-$run.json"
    return
  fi
  for variant in "$@"; do
    stage "$run" profile_gpu --set "profile_gpu.variants=[\"$variant\"]" --set "profile_gpu.requests=$REQUESTS" &&
      cp "$(ls -t artifacts/"$run"/profiles/*/gpu/results.json | head -1)" "$RESULTS/profile-$run-$variant.json"
  done
}

chain() {   # chain RUN: generate, base, finetune (QLoRA where NF4 works), merge, gptq; then profile-gpu
  local run=$1 variants=(fp16) qlora=()
  nf4 || qlora=(--set finetune.load_in_4bit=false)
  stage "$run" generate && stage "$run" base && stage "$run" finetune ${qlora[@]+"${qlora[@]}"} &&
    stage "$run" merge || return
  if [[ " ${available[*]} " == *" gptq "* ]]; then stage "$run" gptq && variants+=(gptq); fi
  if nf4; then variants+=(nf4); fi
  profile "$run" "${variants[@]}"
}

chain smoke
chain llama-1b-shape
if nf4; then
  step "qlora step time" "$PYTHON" scripts/bench_finetune.py --run artifacts/llama-1b-shape --model llama-3.2-1b-shape \
    --device cuda --last 2 --steps 8 --out "$RESULTS/qlora-step.json"
else
  skip "qlora step time" "no NF4 (bitsandbytes) on this host"
fi
helper summary --results "$RESULTS"
echo "gpu-check: results in $RESULTS/ (summary.json)" >&2
