"""The fused path's inference call in whole C++ pieces against one kernel call per layer (CPU).

    python benchmarks/speed_stack.py [--molecules ethanol,aspirin,3BPA,deca-alanine] [--size paper]

An energy + forces call whose results leave without a graph (MD, evaluation, prediction) runs
on the fused path as three C++ calls, each forward and analytic backward
(``forcecentric.nn.kernels``): the front (geometry, radial basis, embeddings; ``et_front``),
all the attention layers (``et_stack``) and the energy head (``energy_head``). No Python and no
autograd node per operation, and the per-atom updates fused into single loops. This script
times the whole call of the fused model side by side, one process, alternating rounds:

* ``whole``: the three C++ calls (the default for such calls);
* ``stack_only``: the layers as one call, the front and the head as PyTorch operations;
* ``per_layer``: one fused kernel call per layer, with the layer norm, projections, filters and
  updates as separate PyTorch operations under autograd (the fused path before 2026-12-08, and
  still the path of calls that keep a graph);
* ``eager`` (with ``--paths``): the plain PyTorch model.

It checks first that the paths give the same forces. It also splits the first path's call: the
time inside the C++ calls (forward and backward) and the rest (neighbour search, the edge
sorting, autograd, the output norm and prior). Figures are medians. ``water-cluster``
(speed.py's 1,029 atoms) is slow: time it with ``--molecules water-cluster --rounds 3
--repeats 3``. Writes benchmarks/results/speed_stack.json.
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

from speed import MOLECULES, WATER, named_structure  # noqa: E402
from speed_profile import median_ms  # noqa: E402
from speed_worker import SIZES  # noqa: E402

from forcecentric.config import ModelConfig  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.nn import kernels  # noqa: E402
from forcecentric.nn.model import ForceField  # noqa: E402
from forcecentric.provenance import machine_info, versions  # noqa: E402

PATHS = ("whole", "stack_only", "per_layer", "eager")


def set_path(model: ForceField, path: str) -> None:
    model.use_fused_kernels(path != "eager")
    rep = model.representation
    rep.fused_stack = path in ("whole", "stack_only")
    rep.fused_front = model.fused_head = path == "whole"


class _ExtensionTimer:
    """Wall time spent inside the extension's calls (wraps it)."""

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


def cpp_share(model: ForceField, path: str, z, pos, batch, repeats: int) -> dict:
    """Mean ms per call of ``path``'s whole call and of its time inside the C++ extension."""
    set_path(model, path)
    for _ in range(3):
        model(z, pos, batch)
    timer = _ExtensionTimer()
    kernels._ext = timer
    try:
        t = time.perf_counter()
        for _ in range(repeats):
            model(z, pos, batch)
        total = time.perf_counter() - t
    finally:
        kernels._ext = timer.ext
    inside = 1000 * timer.seconds / repeats
    return {"path": path, "call_ms_mean": round(1000 * total / repeats, 3), "inside_cpp_ms_mean": round(inside, 3),
            "outside_cpp_ms_mean": round(1000 * total / repeats - inside, 3)}


def measure(molecule: str, args) -> dict:
    numbers, positions = named_structure(molecule)
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
    out["over_" + paths[0]] = {p: round(out["ms_median"][p] / out["ms_median"][paths[0]], 3) for p in paths[1:]}
    if paths[0] != "eager":
        out["split"] = cpp_share(model, paths[0], z, pos, batch, args.repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", default="ethanol,aspirin,3BPA,deca-alanine",
                   help=f"comma-separated, from {', '.join([*MOLECULES, WATER])}")
    p.add_argument("--size", default="paper", choices=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds per molecule")
    p.add_argument("--repeats", type=int, default=30, help="calls per timing")
    p.add_argument("--paths", default="whole,stack_only,per_layer",
                   help=f"comma-separated, from {', '.join(PATHS)}; ratios are to the first")
    p.add_argument("--out", default=str(HERE / "results" / "speed_stack.json"))
    args = p.parse_args()
    molecules, paths = args.molecules.split(","), args.paths.split(",")
    unknown = [m for m in molecules if m not in MOLECULES and m != WATER]
    bad_paths = [x for x in paths if x not in PATHS]
    if unknown or bad_paths:
        p.error(f"unknown molecules {unknown} or paths {bad_paths}")
    torch.set_num_threads(args.threads)
    rows = []
    for molecule in molecules:
        row = measure(molecule, args)
        rows.append(row)
        print(f"{molecule} ({row['n_atoms']} atoms, {row['edges']} edges): "
              + ", ".join(f"{k} {v} ms" for k, v in row["ms_median"].items())
              + "".join(f"; {p} / {paths[0]} {v}x" for p, v in row["over_" + paths[0]].items())
              + (f"; outside C++ {row['split']['outside_cpp_ms_mean']} ms" if "split" in row else ""),
              flush=True)
    write_json({"size": SIZES[args.size], "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                "dtype": "float32", "machine": machine_info("cpu"), "versions": versions(), "rows": rows}, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
