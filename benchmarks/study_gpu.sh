#!/usr/bin/env bash
# The study's GPU part: every pre-training of configs/study.yaml at once on one GPU, then as many
# fine-tuning jobs as fit in FINETUNE_MIN minutes. The study folder stays resumable: copy the
# tarballs back and `forcecentric study -c study` finishes the rest anywhere.
#
#   OUT=/tmp/out CONFIG=study PRETRAIN_WORKERS=13 FINETUNE_MIN=2 bash benchmarks/study_gpu.sh
set -u
OUT=${OUT:-runs/study_gpu}
CONFIG=${CONFIG:-study}
STUDY=${STUDY:-runs/study}
ACCEL=${ACCEL:-gpu}
PRETRAIN_WORKERS=${PRETRAIN_WORKERS:-13}
FINETUNE_WORKERS=${FINETUNE_WORKERS:-14}
FINETUNE_MIN=${FINETUNE_MIN:-2}
FINETUNE_ONLY=${FINETUNE_ONLY:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
FC="python3 -m forcecentric.cli"
t0=$(date +%s)
if [ "$ACCEL" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  # MPS lets the small kernels of many processes share the GPU; off again if it does not work
  if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d 2>/dev/null; then
    if timeout 60 python3 -c "import torch; print('MPS on:', float(torch.ones(8, device='cuda').sum()))"; then
      echo "mps=on" >> "$OUT/gpu.txt"
    else
      echo quit | nvidia-cuda-mps-control; echo "mps=off" >> "$OUT/gpu.txt"
    fi
  fi
fi
$FC study -c "$CONFIG" --phase pretrain --accelerator "$ACCEL" --workers "$PRETRAIN_WORKERS" --no-progress 2>&1 \
  | grep -v "^INFO" | tee "$OUT/pretrain.log"
t1=$(date +%s)
echo "pretrain wall s: $((t1 - t0))" | tee -a "$OUT/times.txt"
tar czf "$OUT/pretrain.tgz" --exclude=checkpoints "$STUDY/pretrain"
$FC study -c "$CONFIG" --phase finetune --accelerator "$ACCEL" --workers "$FINETUNE_WORKERS" \
  --stop-after "$FINETUNE_MIN" $FINETUNE_ONLY --no-progress 2>&1 | grep -v "^INFO" | tee "$OUT/finetune.log"
t2=$(date +%s)
echo "finetune wall s: $((t2 - t1))" | tee -a "$OUT/times.txt"
tar czf "$OUT/finetune.tgz" --exclude=checkpoints --exclude='*.ckpt' "$STUDY/finetune"
