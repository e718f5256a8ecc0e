#!/usr/bin/env bash
# On a lent GPU machine (no package index there): install sceneref from the wheels that
# benchmarks/gpu_wheels.sh made here and earlier calls carried over, then run the GPU scoring
# benchmark within a time limit. Usage, from the repository root there (docs/gpu_benchmark.md):
#   bash benchmarks/gpu_device.sh collect     # in each call but the last: keep this call's wheels
#   bash benchmarks/gpu_device.sh [ARGS...]   # the last call: install, then run with ARGS
# Results go to $OUT (the device tool's folder) or output/gpu-bench-out.
set -euo pipefail
WHEELS=/tmp/gpuwheels
mkdir -p "$WHEELS"
for folder in .gpuwheels/*/; do [ -d "$folder" ] && cp -n "$folder"* "$WHEELS"/ 2>/dev/null || true; done
[ "${1:-}" = collect ] && { ls "$WHEELS" | wc -l; exit 0; }
if ls "$WHEELS"/ray.part-* > /dev/null 2>&1; then
    cat "$WHEELS"/ray.part-* > "$WHEELS/$(cat "$WHEELS/ray.name")" && rm "$WHEELS"/ray.part-*
fi
OUT=${OUT:-output/gpu-bench-out}
mkdir -p "$OUT"
python3 -m venv --system-site-packages /tmp/gpuvenv
/tmp/gpuvenv/bin/pip install -q --no-index --find-links "$WHEELS" -e . 2>&1 | tail -5
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--device cuda --dtypes bf16 fp16 --layouts separate colocated --shapes real)
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
timeout --signal=INT --kill-after=20 "${GPU_BENCH_LIMIT_S:-480}" /tmp/gpuvenv/bin/python benchmarks/gpu_scoring.py "${ARGS[@]}" \
    --json "$OUT/gpu-scoring.json" --models-dir /tmp/gpu-bench-models --work-dir /tmp/gpu-bench 2>&1 \
    | grep -v -e "^INFO" -e "Loading weights" -e "Writing model shards" | tee "$OUT/gpu-scoring.log"
