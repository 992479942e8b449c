"""The fused path's layers in one C++ call against one kernel call per layer (CPU inference).

    python benchmarks/speed_stack.py [--molecules ethanol,aspirin,3BPA,deca-alanine] [--size paper]

An energy + forces call whose results leave without a graph (MD, evaluation, prediction) runs
the ET's attention layers as one C++ call, forward and analytic backward
(``forcecentric.nn.kernels.et_stack``): no Python and no autograd node per operation, and the
per-atom elementwise updates fused into single loops. This script times the whole call of the
fused model side by side, one process, alternating rounds, two ways:

* ``stack``: all layers in one call (the default for such calls);
* ``per_layer``: one fused kernel call per layer, with the layer norm, projections, filters and
  updates as separate PyTorch operations under autograd (the fused path before 2026-12-08, and
  still the path of calls that keep a graph);

and, with ``--paths stack,per_layer,eager``, the eager model too. It checks first that the
variants give the same forces. It also splits the ``stack`` call: the time spent inside the
stack's forward and backward, and the rest (neighbour search, geometry, embeddings, output
head, autograd). Figures are medians. ``water-cluster`` (speed.py's 1,029 atoms) is slow: time
it with ``--molecules water-cluster --rounds 3 --repeats 3``. Writes
benchmarks/results/speed_stack.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import MOLECULES, embed, water_cluster  # noqa: E402
from speed_profile import median_ms  # noqa: E402
from speed_worker import SIZES  # noqa: E402

from forcecentric.config import ModelConfig  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.nn import kernels  # noqa: E402
from forcecentric.nn.model import ForceField  # noqa: E402
from forcecentric.provenance import machine_info, versions  # noqa: E402

PATHS = ("stack", "per_layer", "eager")


def set_path(model: ForceField, path: str) -> None:
    model.use_fused_kernels(path != "eager")
    model.representation.fused_stack = path == "stack"


class _StackTimer:
    """Wall time spent inside the stack's C++ forward and backward (wraps the extension)."""

    def __init__(self) -> None:
        self.ext = kernels.load_extension()
        self.seconds = 0.0

    def __getattr__(self, name):
        fn = getattr(self.ext, name)

        def timed(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def stack_share(model: ForceField, z, pos, batch, repeats: int) -> dict:
    """Mean ms per call of the whole ``stack`` call and of its time inside the stack."""
    set_path(model, "stack")
    for _ in range(3):
        model(z, pos, batch)
    timer = _StackTimer()
    kernels._ext = timer
    try:
        t = time.perf_counter()
        for _ in range(repeats):
            model(z, pos, batch)
        total = time.perf_counter() - t
    finally:
        kernels._ext = timer.ext
    inside = 1000 * timer.seconds / repeats
    return {"call_ms_mean": round(1000 * total / repeats, 3), "inside_stack_ms_mean": round(inside, 3),
            "outside_stack_ms_mean": round(1000 * total / repeats - inside, 3)}


def measure(molecule: str, args) -> dict:
    if molecule == "water-cluster":
        numbers, positions = water_cluster()
    else:
        numbers, positions = embed(MOLECULES[molecule])
    z = torch.tensor(numbers)
    pos = torch.tensor(positions, dtype=torch.float32)
    batch = torch.zeros(len(z), dtype=torch.long)
    torch.manual_seed(0)
    model = ForceField(ModelConfig(**SIZES[args.size])).eval()
    paths = args.paths.split(",")
    forces = {}
    for path in paths:
        set_path(model, path)
        forces[path] = model(z, pos, batch)["forces"]
    ref = forces[paths[0]]
    max_dev = {p: float((forces[p] - ref).abs().max()) for p in paths[1:]}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(args.rounds):
        for path in paths if r % 2 == 0 else paths[::-1]:
            set_path(model, path)
            times[path].append(median_ms(lambda: model(z, pos, batch), repeats=args.repeats, warmup=2))
    out = {"molecule": molecule, "n_atoms": len(numbers),
           "edges": int(model._radius_graph(pos, batch).shape[1]) + len(numbers),
           "max_abs_force_deviation_from_" + paths[0]: max_dev,
           "ms_median": {p: round(statistics.median(v), 3) for p, v in times.items()},
           "ms_rounds": times}
    if "stack" in paths and "per_layer" in paths:
        out["per_layer_over_stack"] = round(out["ms_median"]["per_layer"] / out["ms_median"]["stack"], 3)
    if "stack" in paths:
        out["stack_split"] = stack_share(model, z, pos, batch, args.repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", default="ethanol,aspirin,3BPA,deca-alanine",
                   help=f"comma-separated, from {', '.join([*MOLECULES, 'water-cluster'])}")
    p.add_argument("--size", default="paper", choices=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds per molecule")
    p.add_argument("--repeats", type=int, default=30, help="calls per timing")
    p.add_argument("--paths", default="stack,per_layer", help=f"comma-separated, from {', '.join(PATHS)}")
    p.add_argument("--out", default=str(HERE / "results" / "speed_stack.json"))
    args = p.parse_args()
    molecules = args.molecules.split(",")
    unknown = [m for m in molecules if m not in MOLECULES and m != "water-cluster"]
    bad_paths = [x for x in args.paths.split(",") if x not in PATHS]
    if unknown or bad_paths:
        p.error(f"unknown molecules {unknown} or paths {bad_paths}")
    torch.set_num_threads(args.threads)
    rows = []
    for molecule in molecules:
        row = measure(molecule, args)
        rows.append(row)
        print(f"{molecule} ({row['n_atoms']} atoms, {row['edges']} edges): "
              + ", ".join(f"{k} {v} ms" for k, v in row["ms_median"].items())
              + (f"; per layer / stack {row['per_layer_over_stack']}x" if "per_layer_over_stack" in row else "")
              + (f"; outside the stack {row['stack_split']['outside_stack_ms_mean']} ms" if "stack_split" in row else ""),
              flush=True)
    write_json({"size": SIZES[args.size], "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                "dtype": "float32", "machine": machine_info("cpu"), "versions": versions(), "rows": rows}, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
