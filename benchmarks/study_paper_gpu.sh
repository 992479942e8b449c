#!/usr/bin/env bash
# The study's paper-size round (configs/study_paper.yaml) on one GPU, in the background, so that a
# machine lent for a few minutes at a time can run it across several calls:
#
#   bash benchmarks/study_paper_gpu.sh start            # launches the round detached and returns
#   bash benchmarks/study_paper_gpu.sh wait 300         # waits up to 300 s (or until it is done)
#   bash benchmarks/study_paper_gpu.sh collect DIR      # copies what is finished into DIR
#
# What `start` runs, in this order, each a resumable `forcecentric study` command:
#   * the from-scratch fine-tunings of MOLECULES at N_TRAIN (every seed and learning-rate variant),
#     side by side with
#   * the four pre-trainings (one process each, time-bound by the config);
#   * then the pre-trained models' fine-tunings at the preset rate, then at the other rates.
# PRETRAIN_ONLY=a,b runs only those pre-trainings; FINETUNE=0 runs no fine-tuning at all (e.g. a
# longer pre-training on a GPU, its fine-tunings later on a CPU from the collected .ckpt files).
# The study folder WORK defaults to /dev/shm (every fine-tuning writes its best and last checkpoint
# at each epoch: 43 MB at the paper size, too much for 20 runs at once on a disk). It needs the
# target splits of `--phase prepare` (copied from runs/study_paper/targets when it has none).
# `collect` writes the finished runs without their checkpoints (finetune.tgz, pretrain.tgz), the
# pre-trained models (one .ckpt each) and the logs; unpack them under runs/study_paper and
# `forcecentric study -c study_paper --phase report` reads them like runs made here.
set -u
CONFIG=${CONFIG:-study_paper}
WORK=${WORK:-/dev/shm/study_paper}
ACCEL=${ACCEL:-gpu}
MOLECULES=${MOLECULES:-ethanol}
N_TRAIN=${N_TRAIN:-50}
SCRATCH_WORKERS=${SCRATCH_WORKERS:-9}
PRETRAIN_WORKERS=${PRETRAIN_WORKERS:-4}
FINETUNE_WORKERS=${FINETUNE_WORKERS:-12}
PRETRAINED=${PRETRAINED:-forces_only,forces_zero,forces_denoise,full}
PRETRAIN_ONLY=${PRETRAIN_ONLY:-}
FINETUNE=${FINETUNE:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
FC="python3 -m forcecentric.cli study -c $CONFIG --out $WORK --accelerator $ACCEL --no-progress"
SEL="--only molecule=$MOLECULES --only n_train=$N_TRAIN"

run_round() {
  cd "$ROOT" || exit 1
  if [ "$FINETUNE" = 1 ]; then
    $FC --phase finetune --workers "$SCRATCH_WORKERS" $SEL --only model=scratch > "$WORK/logs/scratch.log" 2>&1 &
  fi
  $FC --phase pretrain --workers "$PRETRAIN_WORKERS" ${PRETRAIN_ONLY:+--only model=$PRETRAIN_ONLY} \
    > "$WORK/logs/pretrain.log" 2>&1
  [ "$FINETUNE" = 1 ] || { date +%s > "$WORK/logs/done"; return; }
  $FC --phase finetune --workers "$FINETUNE_WORKERS" $SEL --only model="$PRETRAINED" --only finetune=default \
    > "$WORK/logs/finetune_default.log" 2>&1
  $FC --phase finetune --workers "$FINETUNE_WORKERS" $SEL --only model="$PRETRAINED" > "$WORK/logs/finetune_rest.log" 2>&1
  wait
  date +%s > "$WORK/logs/done"
}

case "${1:-}" in
start)
  mkdir -p "$WORK/logs"
  [ -d "$WORK/targets" ] || cp -r "$ROOT/runs/study_paper/targets" "$WORK/targets" || exit 1
  if [ "$ACCEL" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/logs/gpu.txt" 2>&1
    # MPS lets the small kernels of many processes share the GPU
    if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d 2>/dev/null; then
      echo "mps=on" >> "$WORK/logs/gpu.txt"
    fi
  fi
  date +%s > "$WORK/logs/start"
  setsid nohup bash "$0" _round > "$WORK/logs/round.log" 2>&1 < /dev/null &
  echo "started: $WORK"
  ;;
_round)
  run_round
  ;;
wait)
  end=$(( $(date +%s) + ${2:-60} ))
  while [ ! -f "$WORK/logs/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  ;;
collect)
  dest=${2:?collect needs a destination folder}
  mkdir -p "$dest"
  dest=$(cd "$dest" && pwd)
  cd "$WORK" || exit 1
  done_list=$(mktemp)
  # finished runs only (metrics.json written), checkpoints left out
  find finetune -name metrics.json 2>/dev/null | xargs -r -n1 dirname | sort > "$done_list"
  tar czf "$dest/finetune.tgz" --exclude=checkpoints --exclude='*.ckpt' -T "$done_list" 2>/dev/null
  tar czf "$dest/pretrain.tgz" --exclude=checkpoints --exclude='*.ckpt' pretrain 2>/dev/null
  for ck in pretrain/*/*/model.ckpt; do
    [ -f "$ck" ] && cp "$ck" "$dest/$(basename "$(dirname "$ck")").ckpt"
  done
  {
    echo "elapsed s: $(( $(date +%s) - $(cat logs/start) ))"; cat logs/gpu.txt
    echo "finished fine-tunings: $(wc -l < "$done_list")"
    for f in logs/*.log; do echo "== $f"; grep -v "^INFO" "$f" | tail -30; done
  } > "$dest/logs.txt" 2>&1
  rm -f "$done_list"
  cat "$dest/logs.txt"
  ;;
*)
  echo "usage: $0 start | wait SECONDS | collect DIR" >&2
  exit 2
  ;;
esac
