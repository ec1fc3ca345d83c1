#!/usr/bin/env bash
# Reproduces docs/results/: adapters vs full fine-tuning on the offline MiniLM-L6-H384 model and the real
# GLUE data, on a 2-core CPU, beside the AdapterHub reference (../shared/bench/peer/).
#
# The sub-grid that fits this machine (the paper's grid is lr {3e-5, 3e-4, 3e-3} x epochs {3, 20} x
# size {8, 64, 256} x 5 seeds): 3 epochs, seed 0, batch 32, 128 tokens, for SST-2, RTE, CoLA and WNLI;
#   adapters: size 64 at lr {3e-4, 3e-3} (SST-2: 3e-3), size 8 at lr 3e-3 (size 256 would be two thirds of MiniLM's
#   hidden size 384: no bottleneck); the pooler trains with them, see README.md;
#   full fine-tuning: lr 3e-5;
#   SST-2 trains on a fixed random 5,000 of its 67,349 examples (dev is complete).
# The peer runs its adapters (size 64, GELU, LayerNorms trained, its default dense-tanh-linear head, lr 3e-3)
# with the same settings; its full fine-tuning was left out for time.
#
#   bash docs/results/run.sh                              # every task, then the report
#   bash docs/results/run.sh cola wnli & bash docs/results/run.sh sst2 rte; bash docs/results/run.sh --report
#                                                         # two at a time: one XLA CPU process keeps ~1.1 cores busy
# Workdirs go to $WORKDIR; a run already finished there is skipped, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:-/tmp/adapter-jax-results}
OUT=docs/results
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(sst2 rte cola wnli)
[ "${tasks[0]}" = --report ] && tasks=()

sweep() {  # task, sub-folder, sweep flags...
  local task=$1 name=$2; shift 2
  python3 -m scripts.sweep --config=configs/glue.py:"$task" --workdir="$WORKDIR/$task/$name" --epochs=3 --seeds=0 \
      "${train_subset[@]}" "$@"
}

for task in "${tasks[@]}"; do
  train_subset=(); peer_subset=()
  if [ "$task" = sst2 ]; then train_subset=(--config.max_train_examples=5000); peer_subset=(--max_train_examples=5000); fi
  learning_rates=3e-4,3e-3
  [ "$task" = sst2 ] && learning_rates=3e-3  # for time; SST-2 learns at 3e-3
  sweep "$task" adapters-64 --modes=adapters --adapter_sizes=64 --learning_rates="$learning_rates" --config.train_pooler=True
  sweep "$task" adapters-8 --modes=adapters --adapter_sizes=8 --learning_rates=3e-3 --config.train_pooler=True
  sweep "$task" full --modes=full --learning_rates=3e-5
  if [ ! -s "$WORKDIR/$task/peer.jsonl" ]; then
    python3 -m scripts.peer --task="$task" --mode=adapters --learning_rate=3e-3 "${peer_subset[@]}" \
        --results="$WORKDIR/$task/peer.jsonl.new"
    mv "$WORKDIR/$task/peer.jsonl.new" "$WORKDIR/$task/peer.jsonl"
  fi
done

if [ $# -eq 0 ] || [ "$1" = --report ]; then
  cat "$WORKDIR"/*/*/results.jsonl > "$OUT/results.jsonl"
  cat "$WORKDIR"/*/peer.jsonl > "$OUT/peer.jsonl"
  python3 -m scripts.report --results="$OUT/results.jsonl,$OUT/peer.jsonl" --out_dir="$OUT"
fi
