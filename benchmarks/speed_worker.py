"""One model's timings for ``benchmarks/speed.py`` (run as a subprocess, in the model's own venv).

    python benchmarks/speed_worker.py --model forcecentric-et --variant eager --size paper \
        --molecules molecules.json --threads 2 --device cpu --dtype float32

Prints one JSON object per molecule on stdout (lines starting with ``ROW ``; our ET's rows come
again at the end with the force check, and the last one counts). Every timing is
end to end, from numpy positions to numpy forces, including the model's own neighbour search:
``latency_ms_median`` for one structure (after warm-up), ``batch_ms_median`` for a batch of
``--batch`` copies in one model call, ``md_steps_per_s`` of velocity-Verlet MD through an ASE
calculator, the process's peak resident memory so far (molecules run smallest first) and, on
CUDA, the peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

SIZES = {
    "paper": dict(hidden_channels=128, num_layers=6, num_heads=8, num_rbf=32, cutoff=5.0),
    "demo": dict(hidden_channels=64, num_layers=3, num_heads=4, num_rbf=32, cutoff=5.0),
}


class Ours:
    """forcecentric's ET through its public API: ``Calculator.predict`` (a fresh neighbour search
    every call, like the peers) and the ``Calculator`` itself for MD (Verlet list, skin 0.5 Å)."""

    name = "forcecentric-et"

    def __init__(self, size: str, variant: str, device: str, dtype: str) -> None:
        import forcecentric
        from forcecentric.config import ModelConfig
        from forcecentric.nn.model import ForceField

        torch.manual_seed(0)
        model = ForceField(ModelConfig(**SIZES[size]))
        model.elements = [1, 6, 7, 8]
        self.num_parameters = model.num_parameters()
        self.settings = {**SIZES[size], "variant": variant, "forcecentric": forcecentric.__version__,
                         "neighbour_list": "forcecentric radius_graph (dense below 64 atoms, vesin above)"}
        self._fused = variant == "fused"
        import copy

        # an eager copy for the force check against the plain float64 path (compile works in place)
        self._eager_copy = copy.deepcopy(model)
        self._reference = None
        self._single = forcecentric.Calculator(model, device=device, dtype=dtype, skin=0.0,
                                               compile=variant == "compiled", fused=self._fused)
        self._md_model = self._single.model
        self._device, self._dtype = device, dtype

    def energy_forces(self, numbers, positions):
        from ase import Atoms

        e, f = self._single.predict([Atoms(numbers=numbers, positions=positions)], batch_size=1)
        return float(e[0]), f[0]

    def energy_forces_batch(self, numbers_list, positions_list):
        from ase import Atoms

        mols = [Atoms(numbers=z, positions=p) for z, p in zip(numbers_list, positions_list)]
        return self._single.predict(mols, batch_size=len(mols))

    def compile_check(self):
        """The compiled model's first-call check against eager (None for other variants)."""
        return getattr(self._single.model, "compile_check", None)

    def force_deviation(self, numbers, positions) -> float:
        """Largest |F - F_ref| (eV/A) of this variant against the plain float64 path (run after
        every timing and memory reading: the float64 pass would raise the peaks)."""
        import forcecentric
        from ase import Atoms

        if self._reference is None:
            self._reference = forcecentric.Calculator(self._eager_copy, device=self._device, dtype="float64",
                                                      skin=0.0, fused=False)
        _, f = self._single.predict([Atoms(numbers=numbers, positions=positions)], batch_size=1)
        _, ref = self._reference.predict([Atoms(numbers=numbers, positions=positions)], batch_size=1)
        return float(np.abs(f[0] - ref[0]).max())

    def calculator(self):
        import forcecentric

        return forcecentric.Calculator(self._md_model, device=self._device, dtype=self._dtype, skin=0.5,
                                       fused=self._fused)


def generic_calculator(peer):
    """An ASE calculator around a peer's end-to-end ``energy_forces`` (its own neighbour search)."""
    from ase.calculators.calculator import Calculator, all_changes

    class PeerCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            e, f = peer.energy_forces(self.atoms.numbers, self.atoms.positions)
            self.results = {"energy": e, "forces": np.asarray(f, dtype=float)}

    return PeerCalculator()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, min_repeats: int, budget_s: float) -> list[float]:
    """Milliseconds of ``fn()`` after ``warmup`` calls: at least ``min_repeats`` calls, more
    while the budget lasts (at most 200)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 200):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - t))
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args) -> None:
    torch.set_num_threads(args.threads)
    molecules = json.loads(Path(args.molecules).read_text())
    t0 = time.perf_counter()
    if args.model == "forcecentric-et":
        model = Ours(args.size, args.variant, args.device, args.dtype)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from speed_peers import build

        model = build(args.model, device=args.device, dtype=args.dtype, size=args.size)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    checked = []
    for mol in molecules:
        z = np.array(mol["numbers"])
        pos = np.array(mol["positions"], dtype=float)
        row = {"model": args.model, "variant": args.variant, "size": args.size, "molecule": mol["name"],
               "n_atoms": int(len(z)), "num_parameters": int(model.num_parameters), "settings": model.settings,
               "threads": args.threads, "device": args.device, "dtype": args.dtype, "error": None}
        try:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            model.energy_forces(z, pos)  # first call: graph capture / compilation
            row["first_call_s"] = round(time.perf_counter() - t + (build_s if mol is molecules[0] else 0.0), 3)
            if hasattr(model, "compile_check"):
                # a compiled model whose first call's forces were off is back on the eager path
                row["compile_check"] = model.compile_check()
            big = len(z) > args.big_atoms  # seconds per call for some models: fewer repeats
            times = timed(lambda: model.energy_forces(z, pos), args.device, 1 if big else args.warmup,
                          3 if big else args.repeats, args.budget_s)
            row.update(latency_ms_median=round(statistics.median(times), 3),
                       latency_ms_p10=round(float(np.percentile(times, 10)), 3),
                       latency_ms_p90=round(float(np.percentile(times, 90)), 3), latency_repeats=len(times))
            if len(z) * args.batch <= args.max_batch_atoms:
                zs = [z] * args.batch
                ps = [pos + rng.normal(scale=0.01, size=pos.shape) for _ in range(args.batch)]
                bt = timed(lambda: model.energy_forces_batch(zs, ps), args.device, 2, 3, args.budget_s)
                row.update(batch=args.batch, batch_ms_median=round(statistics.median(bt), 3),
                           throughput_structures_per_s=round(1000.0 * args.batch / statistics.median(bt), 2))
            else:
                row.update(batch=args.batch, batch_ms_median=None, throughput_structures_per_s=None,
                           batch_skipped=f"{args.batch} x {len(z)} atoms > --max-batch-atoms {args.max_batch_atoms}")
            row.update(md_steps_per_s=md_rate(model, z, pos, args))
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
            if args.device.startswith("cuda"):
                row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        except Exception as exc:  # noqa: BLE001 - a failing model is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=5)
        print("ROW " + json.dumps(row), flush=True)
        checked.append((row, z, pos))
    if hasattr(model, "force_deviation"):
        # after all readings; each row is printed again with the check (the last row counts)
        for row, z, pos in checked:
            if row["error"] is None:
                try:
                    row["force_max_abs_dev_vs_eager_fp64"] = model.force_deviation(z, pos)
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    row["force_check_error"] = f"{type(exc).__name__}: {exc}"
                print("ROW " + json.dumps(row), flush=True)


def md_rate(model, z, pos, args) -> float:
    from ase import Atoms, units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    atoms = Atoms(numbers=z, positions=pos)
    atoms.calc = model.calculator() if hasattr(model, "calculator") else generic_calculator(model)
    thermalize_momenta(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(1 if len(z) > args.big_atoms else 3)
    steps = 3 if len(z) > args.big_atoms else max(5, min(args.md_steps, int(args.md_steps * 27 / max(len(z), 27))))
    _sync(args.device)
    t = time.perf_counter()
    dyn.run(steps)
    _sync(args.device)
    return round(steps / (time.perf_counter() - t), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=["forcecentric-et", "mace", "nequip", "torchmd-net-et"])
    p.add_argument("--variant", default="eager", choices=["eager", "compiled", "fused"])
    p.add_argument("--size", default="paper", choices=list(SIZES))
    p.add_argument("--molecules", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15, help="minimum timed calls per figure")
    p.add_argument("--budget-s", type=float, default=6.0, help="keep timing until this many seconds")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-batch-atoms", type=int, default=4000)
    p.add_argument("--md-steps", type=int, default=40)
    p.add_argument("--big-atoms", type=int, default=200, help="above this size: 1 warm-up, 3 timed calls, 3 MD steps")
    run(p.parse_args())


if __name__ == "__main__":
    main()
