#!/usr/bin/env bash
# The CUDA code paths end to end on the demo (bf16 autocast, pinned memory, nccl under torchrun,
# on-device Phase B), as a user would run them. CI never runs this; bench/gpu.sh times the stages.
#   bash bench/gpu_smoke.sh        # log and reports under $OUT when set, else bench/results/
set -eu -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
W=$(mktemp -d)
cli() { "$PY" -m cli "$@"; }
{
  cli prepare synthetic --out "$W/data" --shard-size 250
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m cli phase-a --data "$W/data" \
    --model ballad-tiny --out "$W/ckpt" --epochs 20 --optimizer adamw --lr 2e-3 --weight-decay 0.05 \
    --batch-size 128 --workers 4 --eval-every 20 --eval-samples 600
  cli extract --ckpt "$W/ckpt/final.pt" --data "$W/data" --out "$W/phase_a.zarr" --workers 4
  cli adapter --features "$W/phase_a.zarr" --lambda 0.2 --batch-size 128 --out "$W/adapter.pt" --device cuda
  cli evaluate --features "$W/phase_a.zarr" --adapter none --out "$DEST/smoke_phase_a"
  cli evaluate --features "$W/phase_a.zarr" --adapter "$W/adapter.pt" --out "$DEST/smoke_ballad"
  cli phase-a --data "$W/data" --model RN50 --out "$W/rn50" --epochs 1 --schedule standard --batch-size 256 --micro-batch 128 \
    --grad-checkpointing --workers 8 --optimizer sgd --lr 1e-5
} 2>&1 | tee "$DEST/gpu_smoke.log"
