"""MD speed through the ASE calculator: steps per second and ns/day of `forcecentric simulate`.

    python benchmarks/md_speed.py [--steps 400] [--threads 2] [--device cpu]

Aspirin (21 atoms, RDKit ETKDG + MMFF) in Nose-Hoover NVT at 500 K with a 0.5 fs step, run by
the same `simulate` loop as `forcecentric simulate` (trajectory frame every 20 steps, thermo
log, stability watchers), for the ET at the paper-like size (F=128, 6 layers, 8 heads, 32 RBFs,
cutoff 5 A) and the demo / pre-training size (F=64, 3 layers), plus GFN2-xTB (tblite) for scale.
Speed does not depend on the weights, so the models are freshly initialised; the watchers are
relaxed (bond threshold 100 A, no minimum-distance stop) so an untrained model is not stopped
early. Writes
benchmarks/results/md_speed.json with the machine, versions and settings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from forcecentric.config import ModelConfig
from forcecentric.evaluation import write_json
from forcecentric.provenance import machine_info
from forcecentric.md.calculator import Calculator
from forcecentric.md.simulate import md_settings, read_structure, simulate
from forcecentric.nn.model import ForceField

SIZES = {
    "ET paper-like (F=128, L=6)": dict(hidden_channels=128, num_layers=6, num_heads=8, num_rbf=32),
    "ET demo (F=64, L=3)": dict(hidden_channels=64, num_layers=3, num_heads=4, num_rbf=32),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--xtb-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eager", action="store_true", help="plain PyTorch ET (Calculator fused=False) for comparison")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "md_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    atoms, source = read_structure("CC(=O)Oc1ccccc1C(=O)O", seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calcs = []
        for name, kw in SIZES.items():
            torch.manual_seed(0)
            model = ForceField(ModelConfig(**kw))
            model.elements = [1, 6, 7, 8]
            calc = Calculator(model, device=args.device, fused=False if args.eager else "auto")
            calcs.append((name, calc, model.num_parameters(), args.steps))
        from forcecentric.data.label import xtb_calculator

        calcs.append(("GFN2-xTB (tblite)", xtb_calculator(), None, args.xtb_steps))
        for k, (name, calc, n_params, steps) in enumerate(calcs):
            s = md_settings(temperature=500.0, timestep_fs=0.5, steps=steps, save_every=20,
                            bond_threshold=100.0, max_temperature=1e6, min_distance=0.0)
            simulate(calc, atoms, Path(tmp) / f"warm{k}", md_settings(steps=10, save_every=5, bond_threshold=100.0, min_distance=0.0),
                     progress=False)
            t = time.perf_counter()
            summary = simulate(calc, atoms, Path(tmp) / f"run{k}", s, progress=False)
            rows.append({
                "model": name, "num_parameters": n_params, "molecule": "aspirin", "n_atoms": len(atoms),
                "steps": summary["steps_completed"], "steps_per_second": round(summary["steps_per_second"], 2),
                "ns_per_day": round(summary["ns_per_day"], 4), "ms_per_step": round(1000 / summary["steps_per_second"], 2),
                "wall_s_including_setup": round(time.perf_counter() - t, 2),
                "stopped_reason": summary["stopped_reason"],
            })
            print(f"{name:28s} {rows[-1]['steps_per_second']:8.1f} steps/s  {rows[-1]['ns_per_day']:.3f} ns/day")
    result = {
        "benchmark": "MD steps per second through forcecentric simulate (ASE Nose-Hoover NVT)",
        "settings": {"ensemble": "nose-hoover", "temperature_K": 500.0, "timestep_fs": 0.5, "save_every": 20,
                     "structure": source, "threads": args.threads, "device": args.device, "dtype": "float32",
                     "et_path": "eager" if args.eager else "fused CPU kernels where available (Calculator default)"},
        "machine": machine_info(args.device) | {"torch_threads": args.threads},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    print(f"-> {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
