#!/usr/bin/env bash
# Virtual environments of the peers timed by benchmarks/speed.py, one each: mace-torch pins
# e3nn 0.4.4 and nequip needs e3nn 0.6, so they cannot share one. torch is pinned to the
# project's 2.13.0 (CPU build here; on a GPU machine install the CUDA build of the same version).
#   bash benchmarks/speed_envs.sh            # -> benchmarks/.venvs/{mace,nequip,torchmd-net-et}
set -euo pipefail
cd "$(dirname "$0")"
declare -A PKG=([mace]="mace-torch==0.3.16" [nequip]="nequip==0.19.1" [torchmd-net-et]="torchmd-net==3.1.0")
for name in mace nequip torchmd-net-et; do
    env=".venvs/$name"
    if [ -x "$env/bin/python" ]; then echo "$env exists"; continue; fi
    python3 -m venv "$env"
    "$env/bin/python" -m pip install -q torch==2.13.0
    "$env/bin/python" -m pip install -q "${PKG[$name]}"
    echo "$env: $("$env/bin/python" -m pip list 2>/dev/null | grep -i -E "^(torch|e3nn|mace-torch|nequip|torchmd-net) " | tr -s ' ' | paste -sd, -)"
done
