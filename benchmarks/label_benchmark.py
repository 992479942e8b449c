"""Labelling throughput of `forcecentric label`'s building blocks, per kind of conformation.

    python benchmarks/label_benchmark.py [--n-molecules 8]

One process, one thread (the way `forcecentric label` runs each worker), on molecules taken
from the bundled corpus list. Times, per molecule: ETKDG embedding + GFN2-xTB optimization to a
minimum (equilibrium records), short Langevin MD with fresh labels (off-equilibrium), and
normal-mode sampling including the Hessian (off-equilibrium). Writes
benchmarks/results/label.json with conformations per core-second for each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from forcecentric.data import label  # noqa: E402
from forcecentric.train.datamodule import resolve_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-molecules", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "label.json"))
    args = p.parse_args()
    lines = resolve_path("bundled:corpus_molecules").read_text().splitlines()[1:]
    mols = [tuple(line.split()[::-1]) for line in lines[: args.n_molecules]]
    t = {"minimum": 0.0, "md": 0.0, "normal_mode": 0.0}
    n = {"minimum": 0, "md": 0, "normal_mode": 0}
    atoms_count = []
    for name, smi in mols:
        t0 = time.perf_counter()
        conf = label.embed(smi, 1, 0, name=name)[0]
        m = label.optimize_minimum(conf)
        t["minimum"] += time.perf_counter() - t0
        n["minimum"] += 1
        atoms_count.append(len(m))
        t0 = time.perf_counter()
        md = label.sample_md(m, temperatures=(300.0, 600.0), n_frames=3, interval_steps=20,
                             equilibration_steps=60, seed=0)
        t["md"] += time.perf_counter() - t0
        n["md"] += len(md)
        t0 = time.perf_counter()
        nm = []
        modes = label.normal_modes(m)
        for temp in (300.0, 600.0, 1000.0):
            nm += label.sample_normal_modes(m, 5, temp, seed=0, modes=modes)
        t["normal_mode"] += time.perf_counter() - t0
        n["normal_mode"] += len(nm)
    rows = {k: {"conformations": n[k], "core_seconds": round(t[k], 2),
                "conformations_per_core_second": round(n[k] / t[k], 3)} for k in t}
    total_n, total_t = sum(n.values()), sum(t.values())
    result = {
        "benchmark": "GFN2-xTB labelling throughput (tblite), one process, one thread",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "tblite": __import__("importlib.metadata").metadata.version("tblite")},
        "molecules": [m[0] for m in mols], "mean_atoms": sum(atoms_count) / len(atoms_count),
        "settings": "corpus settings: 1 minimum, MD at 300/600 K (3 frames each, 60 equilibration steps, "
                    "every 20 steps of 0.5 fs), normal modes at 300/600/1000 K (5 samples each)",
        "per_kind": rows,
        "all": {"conformations": total_n, "core_seconds": round(total_t, 2),
                "conformations_per_core_second": round(total_n / total_t, 3)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2), "\nall:", result["all"])


if __name__ == "__main__":
    main()
