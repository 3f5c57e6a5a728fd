#!/usr/bin/env bash
# The one GPU check (issues 5 and 23), for whichever CUDA GPU runs it (an H200 or H100 with
# python3 3.12, jax 0.11 + CUDA plugin, torch and transformers, and no network). One call,
# under 8 minutes end to end (the phases' limits add up to 450 s, and ~15 s around them):
#   1. the attention kernel compiled on the GPU against dense attention, and timed against
#      jax's own paged_attention and the XLA reference (perf/gpu_kernel_check.py);
#   1b. the LoRA kernels (BGMV/SGMV) compiled on the GPU against the XLA product, and timed
#      against it (perf/gpu_lora_check.py; 30 s; it saves after every case, so a timeout keeps
#      what it measured);
#   2. per model shape (default Llama-3.1-8B's; GPU_CHECK_SHAPES to choose), random weights
#      (perf/gpu_serve_bench.py): Tessera bf16 (the device's copy bandwidth, the roofline's
#      measure; TTFT P50/P99 of 2,048-token prompts; batch-1 decode overlapped and in series;
#      256 concurrent requests of 128 prompt + 256 new tokens; the KV cache sized by
#      --gpu-memory-utilization 0.9), Tessera fp8 (top-1 agreement and logit error against the
#      bf16 weights it is quantized from, then the same workloads), and transformers (bf16, sdpa)
#      on the same workloads (batch-1 decode over 64 tokens: its rate, in less time), each its
#      own process;
#   3. one table, printed last (perf/gpu_table.py) and saved as OUT_DIR/gpu_check.md.
# Pure-Python packages the machine lacks travel as wheels in .whl/ (git-ignored), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl flax==0.12.8
#
#   perf/gpu_check.sh [OUT_DIR]        (default $OUT, else perf/results/gpu-run)
#   GPU_CHECK_SKIP='transformers-llama-3.1-8b' perf/gpu_check.sh    (leave steps out, by name)
#   GPU_CHECK_SHAPES='llama-3.2-1b llama-3.1-8b' perf/gpu_check.sh  (more shapes: more than 8 minutes)
#   GPU_CHECK_SMOKE=1 perf/gpu_check.sh /tmp/x    (tiny shapes on CPU: checks the script itself)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-perf/results/gpu-run}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
# The machine's own flax when it is new enough (0.12, for nnx.List and sharding names), else the carried one.
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tessera-site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/tessera-site"
fi
# cuBLAS for the model's matrix products: far less autotuning at compile time than Triton GEMMs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false"

phase() {  # phase NAME SECONDS CMD...: a step that may fail or time out without stopping the rest
  local name=$1 limit=$2 start=$SECONDS; shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped" | tee -a "$LOG"; return; fi
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc=${PIPESTATUS[0]} in $((SECONDS - start))s" | tee -a "$LOG"
}

# Seconds per phase and shape: tessera bf16, tessera fp8, transformers.
declare -A LIMITS=([llama-3.1-8b]="100 100 90" [llama-3.2-1b]="80 80 60" [tiny]="120 120 120")
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  KERNEL=(--smoke); LORA_LIMIT=300; SHAPES=(tiny)
  SERVE=(--dtype float32 --long-prompt 64 --new 8 --concurrent 4 --ttft-runs 3 --kv-gib 0.01 --copy-mib 16
         --agreement-windows 2 --agreement-length 32)
  HF=()
else
  KERNEL=(); LORA_LIMIT=30; read -r -a SHAPES <<< "${GPU_CHECK_SHAPES:-llama-3.1-8b}"; SERVE=()
  HF=(--decode-new 64)
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG"

phase kernel 130 "$PY" perf/gpu_kernel_check.py --out "$OUT_DIR/kernel.json" "${KERNEL[@]}"
if [[ " ${GPU_CHECK_SKIP:-} " != *" kernel "* ]] && ! grep -q '"kernel_ok": true' "$OUT_DIR/kernel.json" 2>/dev/null; then
  echo "the kernel check failed: serving on the XLA reference attention instead" | tee -a "$LOG"
  SERVE+=(--attention reference)
fi
phase lora-kernel "$LORA_LIMIT" "$PY" perf/gpu_lora_check.py --out "$OUT_DIR/lora.json" "${KERNEL[@]}"
for shape in "${SHAPES[@]}"; do
  read -r limit_bf16 limit_fp8 limit_hf <<< "${LIMITS[$shape]:-120 120 120}"
  bench=("$PY" perf/gpu_serve_bench.py --shape "$shape" "${SERVE[@]}")
  phase "tessera-$shape" "$limit_bf16" "${bench[@]}" --system tessera --out "$OUT_DIR/tessera_$shape.json"
  phase "tessera-$shape-fp8" "$limit_fp8" "${bench[@]}" --system tessera --quantization fp8 \
    --out "$OUT_DIR/tessera_${shape}_fp8.json"
  phase "transformers-$shape" "$limit_hf" "${bench[@]}" "${HF[@]}" --system transformers \
    --out "$OUT_DIR/transformers_$shape.json"
done
"$PY" perf/gpu_table.py "$OUT_DIR" "${SHAPES[@]}" | tee "$OUT_DIR/gpu_check.md"
