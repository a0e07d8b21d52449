#!/usr/bin/env bash
# The GPU checks, in one run on a host with an NVIDIA GPU (about 8 minutes once .venv exists):
# profile-gpu (FP16 vs GPTQ vs NF4: VRAM, energy, kernel, batch 1 and batched) on the smoke run and
# on the Llama 3.2 1B shape twin. Results: artifacts/{smoke,llama-1b-shape}/profiles/<host-id>/gpu/.
#   scripts/gpu-check.sh            (REQUESTS=20 by default; REQUESTS=100 for the full profile)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-20}
export RUNNER=local   # this script drives .venv directly; `make` must do the same
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
make venv
make gptq CONFIG=configs/smoke.toml
.venv/bin/python -m stages.profile_gpu --config configs/smoke.toml --set profile_gpu.requests="$REQUESTS" \
  --set 'profile_gpu.variants=["fp16", "gptq", "nf4"]'      # the shape config already profiles all three
make gptq CONFIG=configs/llama-1b-shape.toml
make profile-gpu CONFIG=configs/llama-1b-shape.toml SET="profile_gpu.requests=$REQUESTS"
for run in smoke llama-1b-shape; do
  echo "== $run"; cat artifacts/$run/profiles/*/gpu/results.json
done
