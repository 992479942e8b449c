#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine: the CUDA tests (tests/test_cuda.py: same results on
# the GPU as on the CPU, training, MD), then the speed benchmark on CUDA beside the CPU figures.
#
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh
#
# On a machine whose Python holds torch but not the rest (an offline GPU box), WHEELS names a folder
# of wheels: WHEELS/common (this project's needs: ase, vesin-torch, pydantic, ...), and one folder per
# peer (mace, nequip, tmd) with its own e3nn, installed into separate targets because their e3nn pins
# conflict; each peer then runs through a small interpreter wrapper that puts its target first.
set -u
OUT=${OUT:-runs/gpu_check}
WHEELS=${WHEELS:-}
TEST_S=${TEST_S:-300}
SPEED_S=${SPEED_S:-380}
SPEED_ARGS=${SPEED_ARGS:---sizes paper --variants eager,compiled --threads 4 --budget-s 2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER_ARGS=()
if [ -n "$WHEELS" ]; then
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pipi /tmp/fc_site "$WHEELS"/common/*.whl || exit 1
  export PYTHONPATH="$ROOT/src:/tmp/fc_site${PYTHONPATH:+:$PYTHONPATH}"
  for peer in mace nequip tmd; do
    [ -d "$WHEELS/$peer" ] || continue
    pipi "/tmp/fc_site_$peer" "$WHEELS/$peer"/*.whl || continue
    printf '#!/bin/sh\nPYTHONPATH=/tmp/fc_site_%s:$PYTHONPATH exec python3 "$@"\n' "$peer" > "/tmp/fc_py_$peer"
    chmod +x "/tmp/fc_py_$peer"
    name=$peer; [ "$peer" = tmd ] && name=torchmd-net-et
    PEER_ARGS+=(--python "$name=/tmp/fc_py_$peer")
  done
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/gpu.txt"
cd "$ROOT"
t0=$(date +%s)
# no log capture: Inductor's debug records of the compile test would fill the report
timeout "$TEST_S" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -p no:logging -rfEs --durations=0 \
  > "$OUT/test_cuda.log" 2>&1
echo "test_cuda: rc $? ($(( $(date +%s) - t0 )) s)"
tail -25 "$OUT/test_cuda.log"
[ -n "${SKIP_SPEED:-}" ] && exit 0
t1=$(date +%s)
# shellcheck disable=SC2086
timeout "$SPEED_S" python3 benchmarks/speed.py --device cuda $SPEED_ARGS "${PEER_ARGS[@]}" --worker-timeout 130 \
  --out "$OUT/speed_gpu.json" --plot "$OUT/speed_scaling_gpu.png" > "$OUT/speed.log" 2>&1
echo "speed: rc $? ($(( $(date +%s) - t1 )) s)"
tail -25 "$OUT/speed.log"
