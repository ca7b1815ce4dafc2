#!/usr/bin/env bash
# One short GPU sitting (a few minutes on an H100/H200): the GPU's name, the test suite's CUDA-relevant
# parts, the step/epoch benchmark in float32 and with --precision bf16 --memory_format channels_last, and the seed-sweep benchmark.
# Every figure lands under $OUT (default bench/results/gpu), progress in $OUT/progress.log.
#     OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/progress.log"; }

log "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/progress.log"
log "tests: speed flags, registry, concurrent seeds (CPU-side tests that also exercise the GPU paths when present)"
timeout 300 python3 -m pytest -q tests/test_speed_flags.py tests/test_bench.py tests/test_concurrent_seeds.py \
    > "$OUT/tests.log" 2>&1; log "tests exit $?"
log "bench float32"
timeout 600 python3 bench/bench.py --device cuda:0 --batch_size 64 --repeats 3 --epoch_images 12800 \
    --loader_images 25000 --num_workers 8 --out "$OUT/bench_f32.json" > "$OUT/bench_f32.txt" 2>&1; log "exit $?"
log "bench --precision bf16 --memory_format channels_last"
timeout 600 python3 bench/bench.py --device cuda:0 --batch_size 64 --repeats 3 --epoch_images 12800 \
    --loader_images 25000 --num_workers 8 --precision bf16 --memory_format channels_last --out "$OUT/bench_amp_cl.json" \
    > "$OUT/bench_amp_cl.txt" 2>&1; log "exit $?"
log "seed sweep: 3 seeds one after the other against --concurrent_seeds 3 (dih-shaped student: res8 ce)"
timeout 600 python3 bench/seed_sweep.py --device cuda:0 --training_type ce --model res8 --seeds 30 50 67 \
    --epochs 2 --train_subset 50000 --out "$OUT/seed_sweep.json" > "$OUT/seed_sweep.txt" 2>&1; log "exit $?"
log "done"
