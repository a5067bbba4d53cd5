#!/usr/bin/env bash
# The memory plan check of issue 20 (benchmarks/plan_gpu.py, ~3 min), then the GPU table of
# issue 11 in one device call (~8 min on one H100/H200): llama-350m and
# llama-1b, seq 256, bf16 autocast over fp32 master weights (train.precision=auto on a GPU),
# full rank, ReLoRA and SwitchLoRA at r=128, eager and compiled. Prints one JSON list per
# (model, compile) after a `# model=... compile=...` line; compare tokens_per_s with
# REFERENCE.md's anchors (350M >= 197k, 1B >= 60k on an H100; scale by peak on another GPU).
#
#   bash benchmarks/gpu.sh            (PYTHON=... to pick the interpreter; OUT=dir keeps the JSON;
#                                      PARTS=memory or PARTS=throughput for one part)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/lrpt-gpu-bench}
mkdir -p "$OUT"
export LRPT_CACHE=${LRPT_CACHE:-$OUT/cache}
$PY -c "import torch, accelerate; assert torch.cuda.is_available()" || { echo "no CUDA torch" >&2; exit 2; }
$PY -c "import trainer" 2>/dev/null || $PY -m pip install -q -e . || exit 2
PARTS=${PARTS:-memory throughput}  # PARTS=memory: the plan check alone (a device call's 10 minutes hold
                                   # both only when nothing hits its time limit)
if [[ " $PARTS " == *" memory "* ]]; then
  # Issue 20 item 8 (~3 min): the memory plan against max_memory_allocated, 8 cases side by side.
  echo "# memory plan vs torch.cuda.max_memory_allocated"
  timeout 240 $PY benchmarks/plan_gpu.py | tee "$OUT/plan-gpu.txt" || echo "# failed or timed out: benchmarks/plan_gpu.py"
fi
[[ " $PARTS " == *" throughput "* ]] || exit 0
STRATEGIES="full relora:strategy.rank=128 switchlora:strategy.rank=128"
# Real vocabulary width (the embedded corpus' tokenizer is small): the head costs what it does at scale.
COMMON="data.seq_len=256 model.vocab_size=32000 logging.eval_batches=1"
for spec in "llama-350m 64" "llama-1b 32"; do
  set -- $spec
  for compile in false true; do
    echo "# model=$1 batch=$2 compile=$compile"
    # Three fresh processes: start-up, compile (about a minute each at 1B) and 12 steps; the
    # limits keep the whole script under ~9.5 min even when every run hits them.
    limit=$([ $compile = true ] && echo 170 || echo 110)
    timeout $limit $PY -c 'import sys; from launcher.cli import main; sys.exit(main())' bench --model "$1" \
      --steps 12 --json --strategies $STRATEGIES --set $COMMON data.batch_size="$2" train.compile=$compile \
      | tee "$OUT/$1-compile-$compile.json" || echo "# failed or timed out: model=$1 compile=$compile"
  done
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
