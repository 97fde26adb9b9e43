#!/usr/bin/env bash
# The whole GPU measurement of the peers issue in one device call (KERAS_BACKEND=jax, XLA):
# GPT-2 124M (12 x 768, 12 heads, vocabulary 50304, sequence 1024) under float32 (TF32),
# mixed_bfloat16 and mixed_float16 with kmp's loss scaling; tokens/s, MFU, peak memory; the
# PyTorch peer on the same GPU in the same process; the memory estimate against each policy's
# measured peak (one process per policy: JAX's peak cannot be reset); the attention kernels'
# ulps and both kernels timed; `kmp tune` (issue 28, part 5).
#
# On the lent machine (see ../shared/device/README.md), from the repository root:
#   ../shared/device/make-wheelhouse .device/wheels      # here, once
#   device run, carry [".device"], command:
#     bash docs/gpu_bench.sh
# Dry run on a CPU at a tiny size (what CI-less sessions can check):
#   GPU_BENCH_DRY=1 OUT=/tmp/gpu-dry bash docs/gpu_bench.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }

if [ -d .device/wheels ]; then
  pip install -q --no-deps --no-index .device/wheels/*.whl 2>&1 | tail -2
  pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || export PYTHONPATH=$PWD
fi
python -c "import kmp" 2>/dev/null || export PYTHONPATH=$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python - <<'PY'
import setuptools, jax, keras, torch
print("python", __import__("sys").version.split()[0], "| setuptools", setuptools.__version__,
      "| jax", jax.__version__, jax.devices(), "| keras", keras.__version__, "| torch",
      torch.__version__, "cuda", torch.cuda.is_available())
PY
} 2>&1 | tee "$OUT/versions.txt"

if [ -n "${GPU_BENCH_DRY:-}" ]; then  # CPU dry run: same commands, tiny shapes
  SHAPE=(--preset tiny --num-layers 1 --hidden-dim 64 --num-heads 2 --intermediate-dim 128
         --seq-len 64 --vocab-size 512 --batch-size 4 --corpus tests/data/corpus.txt)
  TIMING=(--chunk 2 --repeats 2 --warmup 1)
else
  SHAPE=(--preset gpt2-124m --batch-size 16)
  TIMING=(--chunk 10 --repeats 3 --warmup 3)
fi

log "1. a tiny keras.Model.fit on this machine's accelerator"
python - <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import numpy as np, keras, kmp
print(kmp.set_policy("auto"))
m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(1)])
kmp.compile(m, "adam", "mse")
x = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
print("fit losses", m.fit(x, x[:, :1], batch_size=64, epochs=2, verbose=0).history["loss"])
PY

log "2. every policy, XLA, and the torch peer, interleaved in one process"
python -m kmp.cli bench "${SHAPE[@]}" "${TIMING[@]}" \
  --policies float32,mixed_bfloat16,mixed_float16 --xla on --peer torch \
  --out "$OUT/bench" 2>&1 | tail -40 | tee -a "$OUT/log.txt"

log "3. measured peak memory per policy (one process each) against the estimate"
for p in float32 mixed_bfloat16 mixed_float16; do
  python -m kmp.cli bench "${SHAPE[@]}" --chunk 2 --repeats 1 --warmup 1 --policies "$p" \
    --xla on --out "$OUT/memory-$p" > "$OUT/memory-$p.log" 2>&1
  tail -5 "$OUT/memory-$p.log" | tee -a "$OUT/log.txt"
done
python -m kmp.cli memory "${SHAPE[@]}" 2>&1 | tee -a "$OUT/log.txt"

log "4. the attention kernels: the fused kernel's ulps against the island's, then both timed"
python docs/attention_precision.py 2>&1 | tee -a "$OUT/log.txt"
for kernel in island fused; do
  python -m kmp.cli bench "${SHAPE[@]}" "${TIMING[@]}" --policies mixed_bfloat16,mixed_float16 \
    --xla on --attention "$kernel" --out "$OUT/bench-$kernel" 2>&1 | tail -12 | tee -a "$OUT/log.txt"
done

log "5. kmp tune: what auto would pick on this GPU, measured, and how long that takes"
start=$SECONDS
python -m kmp.cli tune "${SHAPE[@]}" --force --out "$OUT/tune" \
  2>&1 | tail -20 | tee -a "$OUT/log.txt"
log "kmp tune took $((SECONDS - start)) s"
log "done"
