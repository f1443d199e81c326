#!/usr/bin/env bash
# The benches of docs/benchmarks.md's "On a GPU" section, in one call of a few minutes:
#
#   OUT=out/accelerator bash bench/accelerator.sh
#
# 1. the stage-1 train step against its PyTorch peer (eager and torch.compile) on the GPU, at
#    widths $WIDTHS (default 512 64 256; batch 256, the issue's setting), float32 in both
#    frameworks (--matmul_precision=highest; torch's TF32 off); then widths 512 and 256 at
#    batch 4096 with TF32 in both, with a bfloat16 JAX variant beside the latter;
# 2. serving end to end (bench/end_to_end.py): sampling on the GPU, ScaNN on the host's cores
#    (E2E_SECONDS=0 skips it).
#
# Each bench is capped by `timeout` (which signals the bench's whole process group, then kills
# it 10 s later), so one that hangs cannot take the others' time; every log is written under
# $OUT with the bench's wall seconds, and the last lines printed are the ratios. Inductor
# compiles in this process (TORCHINDUCTOR_COMPILE_THREADS=1): on 2026-12-01 a width-256 bench
# printed its results and then did not exit before its cap, and a pool of compile workers left
# behind was the suspect. On 2026-12-04, with the workers off, the first bench on a bare
# machine still stalled for over 100 s after torch.compile's first call, and every later one
# took 89-105 s (docs/benchmarks.md); so the first bench gets its own, longer cap
# (FIRST_STEP_SECONDS, default 300).
set -u
OUT=${OUT:-out/accelerator}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

run() {  # run NAME SECONDS ARGS...: one bench, its log in $OUT/NAME.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout -k 10 "$seconds" "$PY" "$@" >"$OUT/$name.txt" 2>&1
  local status=$? wall=$((SECONDS - start))
  echo "wall_seconds=$wall exit=$status" >>"$OUT/$name.txt"
  echo "   exit $status after $wall s; $(grep -E '^(torch_.*ratio|fraction_of_peak|seed_sets_per_s|scann_recall)' \
    "$OUT/$name.txt" | tr '\n' ' ')"
}

cap=${FIRST_STEP_SECONDS:-300}
for width in ${WIDTHS:-512 64 256}; do
  run "train_step_w${width}_f32" "$cap" bench/train_step.py --width="$width" \
    --torch_peer --matmul_precision=highest --no_breakdown --matmul_sizes=4096,8192 --steps=20
  cap=${STEP_SECONDS:-150}
done
run train_step_w512_b4096_tf32 "${STEP_SECONDS:-150}" bench/train_step.py --width=512 \
  --batch=4096 --torch_peer --matmul_precision=tensorfloat32 --no_breakdown \
  --matmul_sizes=4096,8192 --steps=20
run train_step_w256_b4096_tf32 "${STEP_SECONDS:-150}" bench/train_step.py --width=256 \
  --batch=4096 --torch_peer --matmul_precision=tensorfloat32 --no_breakdown \
  --matmul_sizes=4096,8192 --steps=20 --variants='dtype=bfloat16'
if [ "${E2E_SECONDS:-90}" != 0 ]; then
  run end_to_end "${E2E_SECONDS:-90}" bench/end_to_end.py --sizes=100000 \
    --seed_sets=4096 --batch_sizes=256,1024,4096 --rounds=3
fi

echo
for f in "$OUT"/train_step_*.txt; do
  echo "$(basename "$f" .txt): $(grep -E '^(train step:|torch eager step:|torch.compile step:|bfloat16 matmul peak)' "$f" | cut -c1-120 | tr '\n' '|')"
done
grep -sE '^(seed_sets_per_s|scann_recall)' "$OUT/end_to_end.txt"
