#!/usr/bin/env bash
# The issue-14 GPU rows in one device call (as run on an H200, seventeenth and eighteenth
# sessions):
# (1) mean_recipe.py at the reference size for each FlyEM level, all levels trained at once
# (one process each, 2.5 min), then (2) gpu.py's pipeline rows alone on the GPU.
# Run from the repository root on the GPU machine, with OUT set to a results folder, the
# FlyEM volumes in .flyem/ (`python benchmarks/quality/pack_flyem.py --dst .flyem` packs them
# small enough to travel) and, where the machine lacks them, cp312 wheels of dask,
# distributed, zarr and their needs in .whl/ (benchmarks/README.md, "On a GPU").
# Environment: LEVELS, BUDGET (s), SEED, VARIANT (JSON), DEVICE, SAMPLES, SLEEP (s before the GPU
# snapshot), SKIP_PIPELINE, GPU_ARGS;
# SIM=1 skips the wheel install (a rehearsal on a CPU: DEVICE=cpu VARIANT='{}' SAMPLES=0).
set -u
[ -n "${SIM:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
nvidia-smi --query-gpu=name,memory.used --format=csv > $OUT/logs.txt 2>&1
T0=$(date +%s)
pids=()
[ -n "${VARIANT:-}" ] || VARIANT='{"size": "reference"}'
for level in ${LEVELS:-denoise-dose8 denoise-dose2 super-resolve-k4 isotropic-k4 isotropic-k8}; do
  python3 benchmarks/quality/mean_recipe.py --level $level --variants "$VARIANT" \
    --device ${DEVICE:-cuda} --samples ${SAMPLES:-4} --flyem-dir .flyem --cache /tmp/qc_$level \
    --budget ${BUDGET:-150} --seed ${SEED:-0} --out $OUT/gpu_rows.jsonl > /tmp/log_$level.txt 2>&1 &
  pids+=($!)
done
sleep ${SLEEP:-60}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> $OUT/logs.txt 2>&1
for p in "${pids[@]}"; do wait $p; echo "exit $p: $?" >> $OUT/logs.txt; done
echo "quality rows: $(( $(date +%s) - T0 )) s" >> $OUT/logs.txt
for f in /tmp/log_*.txt; do echo "== $f" >> $OUT/logs.txt; tr '\r' '\n' < $f | grep -v "it/s\]$" | tail -15 >> $OUT/logs.txt; done
[ -n "${SKIP_PIPELINE:-}" ] && exit 0
T1=$(date +%s)
OMP_NUM_THREADS=16 python3 benchmarks/gpu.py --out $OUT --name gpu_pipeline --compile on \
  --precisions bf16 --batch-sizes 16 --compile-batch-sizes 16 --budget-s 1 \
  ${GPU_ARGS:-} > $OUT/gpu_log.txt 2>&1
echo "gpu.py: rc $? in $(( $(date +%s) - T1 )) s" >> $OUT/logs.txt
