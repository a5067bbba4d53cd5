#!/usr/bin/env bash
# Issue 21's comparison: 2 nodes x 2 processes on this machine, 100 Mbit/s between the nodes
# (two network namespaces joined by a shaped veth; root), unshaped inside them. Five runs of
# the same model and tokens: full and ReLoRA with DDP over all 4 ranks (flat), ReLoRA + DiLoCo
# with a worker per process (4 workers) and per node (2), full + DiLoCo per node. Prints the
# bench's JSON (inter-node bytes counted and kernel-measured, intra-node bytes, seconds to the
# target loss, final validation loss) and plots validation loss against wall-clock.
#
#   sudo bash benchmarks/two_nodes.sh [OUT] [STEPS] [H]      # defaults: runs/two-nodes 200 10
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/two-nodes}
STEPS=${2:-200}
H=${3:-10}
LRPT=${LRPT:-.venv/bin/lrpt}
# llama-60m widths cut to 2 layers (7.3M parameters with the embedded corpus' 1024-token
# vocabulary); 4 sequences of 64 tokens per rank, so that full rank's all-reduce dominates its step.
SET=(model.num_layers=2 data.seq_len=64 data.batch_size=4 optimizer.lr=1e-3)
RELORA="relora:strategy.rank=32,strategy.reset_every=50,strategy.restart_warmup=10"
# Outer LR 0.6: the DiLoCo scaling-law table's best for 2 and 4 workers (REFERENCE.md).
DILOCO="distributed.sync=diloco,distributed.diloco_inner_steps=$H,distributed.outer_lr=0.6,distributed.outer_momentum=0.9"
mkdir -p "$OUT"
"$LRPT" bench --model llama-60m --steps "$STEPS" --link 100mbit --nodes 2 --nproc-per-node 2 --out "$OUT" --json \
    --set "${SET[@]}" --strategies full "$RELORA" \
    "$RELORA,$DILOCO,distributed.diloco_worker=process" "$RELORA,$DILOCO,distributed.diloco_worker=node" \
    "full:$DILOCO,distributed.diloco_worker=node" | tee "$OUT/bench.json"
"$LRPT" plot $(find "$OUT" -mindepth 2 -maxdepth 2 -name 2x2 | sort) --out "$OUT/plots"
