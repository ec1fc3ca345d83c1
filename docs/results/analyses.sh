#!/usr/bin/env bash
# Reproduces docs/results/tradeoff/ and docs/results/ablation/ (the paper's Figures 3-4 and 6) on the offline
# MiniLM-L6-H384 model and the real GLUE data; docs/results/analyses.md reads them.
#
# Trade-off on SST-2 (a fixed random 5,000 of its training examples; dev complete), 3 epochs, batch 32, 128 tokens,
# learning rates {3e-5, 3e-4, 3e-3} and seeds {0, 1, 2} at every point:
#   adapters m in {2, 8, 32, 64}; fine-tuning the top k in {1, 2, 3} layers; LayerNorm only; full fine-tuning.
#   The pooler trains in every mode (MiniLM's was never trained; see docs/results/README.md).
# Ablation: adapters m=64 on SST-2 (5k) and on CoLA (all 8,551 examples), the same grid; the seed-0 run at the
# learning rate best on dev is ablated.
#
#   bash docs/results/analyses.sh              # one sweep after another (a 2-core CPU: ~55 hours, an estimate)
#   bash docs/results/analyses.sh --parallel   # the ten sweeps at once, as run for the committed results on one
#                                              # NVIDIA H200 (16 CPU cores): ~9 minutes
#   bash docs/results/analyses.sh --report     # the figures and tables again from the committed results alone
# Workdirs go to $WORKDIR; a finished run there is skipped, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:-/tmp/adapter-jax-analyses}
OUT=docs/results
mode=${1:-}

sweep() {  # name, sweep flags...
  local name=$1; shift
  python3 -m scripts.sweep "$@" --workdir="$WORKDIR/$name" --epochs=3 --learning_rates=3e-5,3e-4,3e-3 \
      --seeds=0,1,2 --predict_test=none --config.train_pooler=True > "$WORKDIR/$name.out" 2>&1 &
  [ "$mode" = --parallel ] || wait
}

if [ "$mode" != --report ]; then
  mkdir -p "$WORKDIR"
  # Ten processes share one GPU: each takes the memory it needs instead of XLA's default 75%.
  [ "$mode" = --parallel ] && export XLA_PYTHON_CLIENT_PREALLOCATE=false
  sst2=(--config=configs/glue.py:sst2 --config.max_train_examples=5000)
  for m in 2 8 32 64; do sweep "sst2-adapters-m$m" "${sst2[@]}" --modes=adapters --adapter_sizes="$m"; done
  for k in 1 2 3; do sweep "sst2-top_k-k$k" "${sst2[@]}" --modes=top_k --top_k="$k"; done
  sweep sst2-layernorm "${sst2[@]}" --modes=layernorm
  sweep sst2-full "${sst2[@]}" --modes=full
  sweep cola-adapters-m64 --config=configs/glue.py:cola --modes=adapters --adapter_sizes=64
  wait
  cat "$WORKDIR"/sst2-*/results.jsonl > "$OUT/tradeoff/sst2_results.jsonl"
  cp "$WORKDIR/sst2-adapters-m64/results.jsonl" "$OUT/ablation/sst2/results.jsonl"
  cp "$WORKDIR/cola-adapters-m64/results.jsonl" "$OUT/ablation/cola/results.jsonl"
  # The committed ablations: SST-2 learned best at 3e-3, CoLA at 3e-4 (seed 0).
  python3 -m scripts.ablate --workdir="$WORKDIR/sst2-adapters-m64/adapters-m64-lr0.003-ep3-seed0" \
      --out_dir="$OUT/ablation/sst2"
  python3 -m scripts.ablate --workdir="$WORKDIR/cola-adapters-m64/adapters-m64-lr0.0003-ep3-seed0" \
      --out_dir="$OUT/ablation/cola"
fi
python3 -m scripts.report --results="$OUT/tradeoff/sst2_results.jsonl" --out_dir="$OUT/tradeoff"
python3 -m scripts.ablate --replot="$OUT/ablation/sst2/ablation.json"
python3 -m scripts.ablate --replot="$OUT/ablation/cola/ablation.json"
