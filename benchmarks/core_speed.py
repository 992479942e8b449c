"""Parameter count and single-molecule energy+forces latency of the ET force field.

    python benchmarks/core_speed.py [--repeats 50] [--device cpu]

Writes benchmarks/results/core_speed.json (machine, versions, settings, every figure). The
molecule is aspirin (21 atoms) embedded with RDKit; the model is the paper-like size
(F=128, 6 layers, 8 heads, 32 RBFs, cutoff 5 A) and the demo size (F=64, 3 layers, 4 heads).
Latency is the median over repeats after warm-up, eval mode, forces by autograd.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from forcecentric.config import ModelConfig
from forcecentric.evaluation import write_json
from forcecentric.provenance import machine_info
from forcecentric.nn.model import ForceField

SIZES = {
    "paper-like (F=128, L=6)": dict(hidden_channels=128, num_layers=6, num_heads=8, num_rbf=32),
    "demo (F=64, L=3)": dict(hidden_channels=64, num_layers=3, num_heads=4, num_rbf=32),
}


def aspirin() -> tuple[np.ndarray, np.ndarray]:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    pos = mol.GetConformer().GetPositions()
    return np.array([a.GetAtomicNum() for a in mol.GetAtoms()]), pos


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "core_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    z_np, pos_np = aspirin()
    dev = torch.device(args.device)
    rows = []
    for name, kw in SIZES.items():
        torch.manual_seed(0)
        model = ForceField(ModelConfig(**kw)).to(dev).eval()
        for dtype in (torch.float32, torch.float64):
            model = model.to(dtype)
            z = torch.tensor(z_np, device=dev)
            pos = torch.tensor(pos_np, dtype=dtype, device=dev)
            times = []
            for i in range(args.warmup + args.repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = model(z, pos)
                out["forces"].sum().item()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(1000 * (time.perf_counter() - t))
            rows.append({
                "model": name, **kw, "cutoff": 5.0, "dtype": str(dtype).replace("torch.", ""),
                "molecule": "aspirin", "n_atoms": int(len(z_np)), "num_parameters": model.num_parameters(),
                "latency_ms_median": round(statistics.median(times), 3),
                "latency_ms_p10": round(float(np.percentile(times, 10)), 3),
                "latency_ms_p90": round(float(np.percentile(times, 90)), 3),
                "repeats": args.repeats,
            })
            print(f"{name:26s} {rows[-1]['dtype']:8s} params {rows[-1]['num_parameters']:>9,d}  "
                  f"median {rows[-1]['latency_ms_median']:.2f} ms")
    result = {
        "benchmark": "single-molecule energy + forces latency",
        "machine": machine_info(str(dev)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    print(f"-> {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
