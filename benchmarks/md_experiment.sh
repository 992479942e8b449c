#!/usr/bin/env bash
# MD-stability experiment (issue #4): does force-centric pre-training give stable MD?
#   (a) ET trained from scratch on the target's forces (+ energies) only,
#   (b) ET pre-trained on off-equilibrium forces only (zero-force and denoising weights 0),
#   (c) the full force-centric ET (force matching + zero-force + force-based denoising),
# each fine-tuned with the same budget on the same 100 frames of molecules held out of
# pre-training: aspirin (bundled GFN2-xTB frames), ethanol (rMD17 DFT) and 3BPA (DFT), the last
# two read from ../shared/data. Then `forcecentric md-benchmark -c md_stability` (500 K, 0.5 fs,
# Nose-Hoover, 20 ps, 3 seeds).
# Two jobs run side by side with one thread each (2-core machine). Every stage resumes or is
# skipped when its output exists, so the script can be re-run after an interruption.
#
#   bash benchmarks/md_experiment.sh            # about 2.5 hours on 2 CPU cores
set -euo pipefail
OUT=${OUT:-runs/md_experiment}
SHARED=${SHARED:-../shared/data}
FT_EPOCHS=${FT_EPOCHS:-50}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

pretrain() {  # name, extra args...
  local name=$1; shift
  [ -f "$OUT/pretrain_$name/model.ckpt" ] && return 0
  local resume=""; [ -f "$OUT/pretrain_$name/checkpoints/last.ckpt" ] && resume="--resume"
  forcecentric pretrain -c demo_pretrain --run-dir "$OUT/pretrain_$name" $resume \
    --set data.n_train=12000 --set trainer.max_epochs=4 --set trainer.progress_bar=false "$@" \
    > "$OUT/pretrain_$name.log" 2>&1
}
pretrain forces_only --set loss.zero_force=0 --set loss.denoise=0 &
pretrain full &
wait

finetune() {  # model, molecule, data
  local model=$1 mol=$2 data=$3 run="$OUT/finetune_$1_$2"
  [ -f "$run/model.ckpt" ] && return 0
  local from=(); [ "$model" != scratch ] && from=(--from "$OUT/pretrain_$model/model.ckpt")
  local resume=""; [ -f "$run/checkpoints/last.ckpt" ] && resume="--resume"
  forcecentric finetune -c demo_finetune --run-dir "$run" $resume "${from[@]}" --data "$data" \
    --set trainer.max_epochs="$FT_EPOCHS" --set trainer.progress_bar=false > "$run.log" 2>&1
}
for model in scratch forces_only full; do
  finetune "$model" aspirin bundled:demo_target &
  finetune "$model" ethanol "$SHARED/botnet_ethanol_rmd17/train.xyz" &
  wait
done
for model in scratch forces_only full; do
  finetune "$model" 3BPA "$SHARED/botnet_3bpa/train_300K.xyz"
done

ETH="$SHARED/botnet_ethanol_rmd17/test_MD.xyz"
forcecentric md-benchmark -c md_stability --out "$OUT/md_benchmark" --workers 2 --no-progress \
  --set molecules.ethanol.structure="$ETH" --set molecules.ethanol.reference="$ETH" \
  --set molecules.3BPA.structure="$SHARED/botnet_3bpa/train_300K.xyz" \
  --set models.scratch="$OUT/finetune_scratch_{molecule}/model.ckpt" \
  --set models.forces_only="$OUT/finetune_forces_only_{molecule}/model.ckpt" \
  --set models.force_centric="$OUT/finetune_full_{molecule}/model.ckpt"
