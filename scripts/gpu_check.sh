#!/usr/bin/env bash
# One prepared check for a single NVIDIA GPU (H100/H200), under 8 minutes:
#   1. correctness on the GPU: the dispatch oracle tests and the routing tests
#      (one real device; the mesh tests run on 8 fake CPU devices as in CI);
#   2. throughput and MFU in bfloat16 for the ~490M-parameter MoE of
#      configs/switch.py:gpu and its dense twins (and the MoE layer per
#      dispatch path), against a matmul peak measured in the same run and
#      the declared H100/H200 dense bf16 peak (989 TFLOP/s).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (writes OUT_DIR/gpu_bench.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$out/gpu.txt"

# 1. Correctness on the GPU (float32 reference tolerances).
JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider \
  tests/test_dispatch.py tests/test_routing.py 2>&1 | tail -3 | tee "$out/tests.txt"
# The sharded-equals-single tests need 8 devices: on one GPU they run on
# 8 fake CPU devices, exactly as CI runs them.
JAX_PLATFORMS=cpu timeout 300 python -m pytest -q -p no:cacheprovider \
  tests/test_sharding.py -k "mesh_equals_single_device and gather" 2>&1 | tail -3 | tee -a "$out/tests.txt"

# 2. Throughput and MFU, bf16, ~490M-parameter MoE and its twins, one GPU.
python scripts/bench.py --config configs/switch.py:gpu --steps 20 --rounds 2 \
  --out "$out/gpu_bench.json" 2>&1 | tee "$out/bench.txt"
