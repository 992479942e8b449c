"""Speed of the ET against NequIP, MACE and TorchMD-Net's own ET, side by side in one run.

    python benchmarks/speed.py                         # CPU, every model, paper and demo sizes
    python benchmarks/speed.py --device cuda --out benchmarks/results/speed_gpu.json

Energy + forces of real molecules of growing size (ethanol 9 atoms, aspirin 21, 3BPA 27, a
deca-alanine peptide 103, a 1,029-atom water cluster; RDKit / ASE geometries), for

* this project's ET at the paper-like size (F=128, 6 layers, 8 heads, 32 RBFs, cutoff 5 Å) and the
  pre-training size (F=64, 3 layers): eager, ``torch.compile``-d, and through the fused C++ CPU
  kernels (``forcecentric.nn.kernels``);
* MACE, NequIP and TorchMD-Net's ET (``benchmarks/speed_peers.py``), each in its own virtual
  environment (their e3nn pins conflict): ``bash benchmarks/speed_envs.sh`` makes them under
  ``benchmarks/.venvs/``; ``--python NAME=PATH`` or the environment variables
  ``FC_BENCH_PYTHON_MACE``, ``..._NEQUIP``, ``..._TORCHMD_NET_ET`` name others.

Every model runs in its own worker process (``benchmarks/speed_worker.py``), one after the other,
in this one invocation, all rows sharing its ``run_id``; ``--passes 2`` runs the list forwards
then backwards and keeps the median of the passes. A model that fails to install or run gives
rows with its error. Writes ``benchmarks/results/speed.json`` (a list of rows with machine,
versions, settings and every figure), ``speed.md`` (table of medians and ratios) and
``docs/figures/speed_scaling.png`` (time against atoms). Also counts our ET's matmul FLOPs per
molecule (``torch.utils.flop_counter``) and divides by the measured single-precision GEMM rate
of this machine: the FLOP-bound time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ("mace", "nequip", "torchmd-net-et")
#: the benchmark's geometries (made once by molecules(); every machine times the same structures)
MOLECULES_FILE = HERE / "speed_molecules.json"
MOLECULES = {
    "ethanol": "CCO",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "3BPA": "Nc1ncccc1OCc1ccccc1",
    "deca-alanine": "N" + "C(C)C(=O)N" * 9 + "C(C)C(=O)O",
}


def embed(smiles: str, seed: int = 0) -> tuple[list[int], list[list[float]]]:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles}")
    AllChem.MMFFOptimizeMolecule(mol)
    return [a.GetAtomicNum() for a in mol.GetAtoms()], mol.GetConformer().GetPositions().tolist()


def water_cluster(n_side: int = 7, spacing: float = 3.1, seed: int = 0):
    """``n_side^3`` water molecules on a cubic grid (about liquid density), random orientations."""
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    w = molecule("H2O")
    base = w.positions - w.positions.mean(0)
    numbers, positions = [], []
    for ix in range(n_side):
        for iy in range(n_side):
            for iz in range(n_side):
                rot = Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix()
                positions += (base @ rot.T + spacing * np.array([ix, iy, iz])).tolist()
                numbers += w.numbers.tolist()
    return numbers, positions


#: the water cluster by name, for the scripts that time one structure at a time
WATER = "water-cluster"


def named_structure(name: str) -> tuple[list[int], list[list[float]]]:
    """``(numbers, positions)`` of a molecule of :data:`MOLECULES` or of the water cluster (:data:`WATER`)."""
    return water_cluster() if name == WATER else embed(MOLECULES[name])


def molecules() -> list[dict]:
    out = []
    for name, smi in MOLECULES.items():
        z, pos = embed(smi)
        out.append({"name": name, "smiles": smi, "numbers": z, "positions": pos})
    z, pos = water_cluster()
    out.append({"name": f"water cluster ({len(z) // 3} H2O)", "smiles": None, "numbers": z, "positions": pos})
    return out


def load_or_make_molecules(path: Path | None) -> list[dict]:
    """The benchmark's structures: read from ``path`` when it exists (the same geometries on every
    machine, and no RDKit needed there), else made by :func:`molecules` (and written to ``path``)."""
    if path is not None and path.is_file():
        mols = json.loads(path.read_text())
        for k, m in enumerate(mols):
            if not {"name", "numbers", "positions"} <= set(m) or len(m["numbers"]) != len(m["positions"]):
                raise SystemExit(f"{path}: record {k} needs name, numbers and positions of equal length")
        return mols
    mols = molecules()
    if path is not None:
        from forcecentric.evaluation import write_json

        write_json(mols, path)
    return mols


def gemm_gflops(threads: int, device: str, n: int = 1024) -> float:
    """Measured single-precision matmul rate (the FLOP-bound reference)."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def flop_counts(mols: list[dict], size: str) -> dict[str, int]:
    """Matmul FLOPs of one energy + forces evaluation of our ET: the model's own call (forward,
    then the backward to the positions that the forces need, not the weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(HERE))
    from speed_worker import SIZES

    from forcecentric.config import ModelConfig
    from forcecentric.nn.model import ForceField

    torch.manual_seed(0)
    model = ForceField(ModelConfig(**SIZES[size])).eval()
    out = {}
    for m in mols:
        z = torch.tensor(m["numbers"])
        pos = torch.tensor(m["positions"], dtype=torch.float32, requires_grad=True)
        batch = torch.zeros(len(z), dtype=torch.long)
        edges = model._radius_graph(pos, batch)
        # two counters: the counter's module hooks cannot follow an autograd.grad() started on a
        # graph built under the same counter
        with FlopCounterMode(display=False) as forward:
            energy = model._energy(z, pos, batch, 1, edges)["energy"].sum()
        with FlopCounterMode(display=False) as backward:
            (grad,) = torch.autograd.grad(energy, pos)
        assert grad.shape == pos.shape
        out[m["name"]] = int(forward.get_total_flops() + backward.get_total_flops())
    return out


def run_worker(python: str, model: str, variant: str, size: str, mol_file: Path, args) -> list[dict]:
    cmd = [python, str(HERE / "speed_worker.py"), "--model", model, "--variant", variant, "--size", size,
           "--molecules", str(mol_file), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
           "--md-steps", str(args.md_steps), "--batch", str(args.batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    if model == "forcecentric-et":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    t = time.time()
    print(f"  {model} {variant} {size} ({python}) ...", flush=True, end="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
    # one row per molecule: the worker's last (our ET's come again with the force check)
    rows = list({r["molecule"]: r for r in (json.loads(line[4:]) for line in proc.stdout.splitlines()
                                           if line.startswith("ROW "))}.values())
    print(f" {time.time() - t:.0f} s, {len(rows)} rows", flush=True)
    if proc.returncode != 0 or not rows:
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        done = {r["molecule"] for r in rows}
        mols = json.loads(mol_file.read_text())
        rows += [{"model": model, "variant": variant, "size": size, "molecule": m["name"],
                  "n_atoms": len(m["numbers"]), "latency_ms_median": None,
                  "error": f"worker exited with {proc.returncode}: {err}", "stderr_tail": proc.stderr[-3000:]}
                 for m in mols if m["name"] not in done]
    return rows


def pythons(args) -> dict[str, str]:
    """Interpreter per model: ours is this one; a peer's from --python, the environment, or the
    venv ``benchmarks/.venvs/<peer>`` that ``benchmarks/speed_envs.sh`` makes."""
    out = {"forcecentric-et": sys.executable}
    for peer in PEERS:
        venv_python = HERE / ".venvs" / peer / "bin" / "python"
        if venv_python.is_file():
            out[peer] = str(venv_python)
    for peer in PEERS:
        env = os.environ.get("FC_BENCH_PYTHON_" + peer.upper().replace("-", "_"))
        if env:
            out[peer] = env
    for item in args.python or []:
        name, _, path = item.partition("=")
        out[name] = path
    return out


def combine(passes: list[list[dict]]) -> list[dict]:
    """Median over passes of each row's figures (the first pass's row otherwise)."""
    keyed: dict[tuple, list[dict]] = {}
    for rows in passes:
        for r in rows:
            keyed.setdefault((r["model"], r["variant"], r["size"], r["molecule"]), []).append(r)
    out = []
    for rs in keyed.values():
        row = dict(rs[0])
        for k in ("latency_ms_median", "batch_ms_median", "throughput_structures_per_s", "md_steps_per_s"):
            vals = [r.get(k) for r in rs if r.get(k) is not None]
            row[k] = round(statistics.median(vals), 3) if vals else row.get(k)
        row["passes"] = len(rs)
        out.append(row)
    return out


def add_ratios(rows: list[dict]) -> None:
    """``ratio_to_ours``: this row's latency over our ET's (same size; our faster variant)."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["model"] == "forcecentric-et" and r.get("latency_ms_median"):
            key = (r["size"], r["molecule"])
            best[key] = min(best.get(key, float("inf")), r["latency_ms_median"])
    for r in rows:
        ours = best.get((r["size"], r["molecule"]))
        r["ratio_to_ours"] = round(r["latency_ms_median"] / ours, 2) if ours and r.get("latency_ms_median") else None


def markdown(rows: list[dict], meta: dict) -> str:
    mols = list(dict.fromkeys(r["molecule"] for r in rows))
    lines = [f"run `{meta['run_id']}`, {meta['machine']['device']}, {meta['threads']} threads, {meta['dtype']}; "
             "energy + forces of one structure, median ms (× = time / our faster variant's)\n",
             "| model | size | params | " + " | ".join(f"{m} ({next(r['n_atoms'] for r in rows if r['molecule'] == m)})"
                                                    for m in mols) + " |",
             "|---|---|---:|" + "---:|" * len(mols)]
    order = {"forcecentric-et": 0, "torchmd-net-et": 1, "mace": 2, "nequip": 3}
    groups = sorted({(r["model"], r["variant"], r["size"]) for r in rows},
                    key=lambda g: (g[2] != "paper", order.get(g[0], 9), g[1]))
    for model, variant, size in groups:
        rs = {r["molecule"]: r for r in rows if (r["model"], r["variant"], r["size"]) == (model, variant, size)}
        params = next((r.get("num_parameters") for r in rs.values() if r.get("num_parameters")), None)
        cells = []
        for m in mols:
            r = rs.get(m)
            if r is None:
                cells.append("")
            elif r.get("error"):
                cells.append("error")
            else:
                fell_back = (r.get("compile_check") or {}).get("passed") is False
                cells.append(f"{r['latency_ms_median']:.1f} ({r['ratio_to_ours']:.2f}×)" + ("†" if fell_back else ""))
        label = model + (f" ({variant})" if model == "forcecentric-et" else "")
        lines.append(f"| {label} | {size} | {params or ''} | " + " | ".join(cells) + " |")
    if any((r.get("compile_check") or {}).get("passed") is False for r in rows):
        lines.append("\n† compiled forces differed from the eager model's on the first call "
                     "(compile_check in the JSON): the model ran the eager path")
    errors = {(r["model"], r["error"]) for r in rows if r.get("error")}
    if errors:
        lines.append("\nErrors:\n")
        lines += [f"- {m}: `{e}`" for m, e in sorted(errors)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_png: Path, size: str = "paper") -> Path:
    from forcecentric.plots import _write_png, plt

    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for (model, variant) in sorted({(r["model"], r["variant"]) for r in rows if r["size"] == size}):
        rs = sorted((r for r in rows if (r["model"], r["variant"], r["size"]) == (model, variant, size)
                     and r.get("latency_ms_median")), key=lambda r: r["n_atoms"])
        if rs:
            label = model + (f" ({variant})" if model == "forcecentric-et" else "")
            ax.plot([r["n_atoms"] for r in rs], [r["latency_ms_median"] for r in rs], "o-", label=label)
    flops = [r for r in rows if r["size"] == size and r.get("flop_bound_ms") and r["model"] == "forcecentric-et"
             and r["variant"] == "eager"]
    if flops:
        flops.sort(key=lambda r: r["n_atoms"])
        ax.plot([r["n_atoms"] for r in flops], [r["flop_bound_ms"] for r in flops], "k--", label="our ET, FLOP bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("atoms")
    ax.set_ylabel("energy + forces, one structure (ms)")
    machine = next((r["machine"] for r in rows if r.get("machine")), {})
    where = machine.get("gpu") or f"{machine.get('cpu', 'cpu')}, {rows[0].get('threads', '?')} threads"
    ax.set_title(f"latency vs size ({size} size models)\n{where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _write_png(fig, out_png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="forcecentric-et,torchmd-net-et,mace,nequip")
    p.add_argument("--variants", default="eager,compiled,fused",
                   help="of our ET: eager, compiled (torch.compile), fused (the C++ CPU kernels)")
    p.add_argument("--sizes", default="paper,demo")
    p.add_argument("--python", action="append", metavar="NAME=PATH", help="interpreter of a peer's venv")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--budget-s", type=float, default=5.0)
    p.add_argument("--md-steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--passes", type=int, default=1, help="2: forwards then backwards, median of the passes")
    p.add_argument("--only-molecules", default=None, help="comma-separated subset of molecule names")
    p.add_argument("--molecules-file", default=str(MOLECULES_FILE),
                   help="JSON list of {name, numbers, positions}: read if it exists, else made (RDKit, ASE) "
                        "and written there")
    p.add_argument("--worker-timeout", type=float, default=3600)
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "figures" / "speed_scaling.png"))
    p.add_argument("--recount-flops", action="store_true",
                   help="only redo the FLOP fields of the results file --out (no timing runs)")
    args = p.parse_args()
    if args.recount_flops:
        recount_flops(Path(args.out), Path(args.plot), Path(args.molecules_file))
        return

    from forcecentric.provenance import machine_info, versions

    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: timings will be noisy", file=sys.stderr)
    mols = load_or_make_molecules(Path(args.molecules_file))
    if args.only_molecules:
        keep = args.only_molecules.split(",")
        mols = [m for m in mols if m["name"] in keep or m["name"].split(" ")[0] in keep]
    py = pythons(args)
    jobs = []
    for size in args.sizes.split(","):
        for model in args.models.split(","):
            if size != "paper" and model in ("mace", "nequip"):
                continue  # one published size each (speed_peers.SIZES)
            for variant in (args.variants.split(",") if model == "forcecentric-et" else ["eager"]):
                jobs.append((model, variant, size))
    passes = []
    with tempfile.TemporaryDirectory() as tmp:
        mol_file = Path(tmp) / "molecules.json"
        mol_file.write_text(json.dumps(mols))
        for k in range(args.passes):
            print(f"pass {k + 1}/{args.passes}", flush=True)
            rows = []
            for model, variant, size in (jobs if k % 2 == 0 else jobs[::-1]):
                if model not in py:
                    rows += [{"model": model, "variant": variant, "size": size, "molecule": m["name"],
                              "n_atoms": len(m["numbers"]), "latency_ms_median": None,
                              "error": f"no interpreter for {model}: pass --python {model}=PATH"} for m in mols]
                    continue
                rows += run_worker(py[model], model, variant, size, mol_file, args)
            passes.append(rows)
    rows = combine(passes)
    gflops = gemm_gflops(args.threads, args.device)
    annotate_flops(rows, mols, gflops)
    add_ratios(rows)
    meta = {"run_id": run_id, "machine": machine_info(args.device), "versions": versions(),
            "threads": args.threads, "dtype": args.dtype, "gemm_gflops": round(gflops, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for r in rows:
        r.update(run_id=run_id, machine=meta["machine"], forcecentric_env_versions=meta["versions"],
                 gemm_gflops=meta["gemm_gflops"])
    write_reports(rows, meta, Path(args.out), Path(args.plot))


def annotate_flops(rows: list[dict], mols: list[dict], gflops: float) -> None:
    """``matmul_gflop``, ``flop_bound_ms`` (at ``gflops``) and ``over_flop_bound`` of our ET's rows."""
    sizes = sorted({r["size"] for r in rows if r["model"] == "forcecentric-et"})
    flops = {size: flop_counts(mols, size) for size in sizes}
    for r in rows:
        if r["model"] == "forcecentric-et":
            f = flops.get(r["size"], {}).get(r["molecule"])
            r["matmul_gflop"] = round(f / 1e9, 4) if f else None
            r["flop_bound_ms"] = round(f / (gflops * 1e9) * 1e3, 3) if f else None
            if f and r.get("latency_ms_median"):
                r["over_flop_bound"] = round(r["latency_ms_median"] / r["flop_bound_ms"], 2)


def write_reports(rows: list[dict], meta: dict, out: Path, plot_png: Path) -> None:
    from forcecentric.evaluation import write_json

    write_json(rows, out)
    md = markdown(rows, meta) + (f"\nFLOP bound: matmul FLOPs of our ET's energy + forces call "
                                 f"(torch.utils.flop_counter: the forward and the backward to the positions) "
                                 f"/ measured fp32 GEMM rate {meta['gemm_gflops']:.1f} GFLOP/s.\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"plot: {plot(rows, plot_png)}")
    print(f"results: {out}")


def recount_flops(path: Path, plot_png: Path, molecules_file: Path = MOLECULES_FILE) -> None:
    """Redo the FLOP fields of an existing results file (the count does not depend on the timings;
    the GEMM rate is the one measured in that run) and rewrite its JSON, table and plot."""
    rows = json.loads(path.read_text())
    names = {r["molecule"] for r in rows}
    mols = [m for m in load_or_make_molecules(molecules_file) if m["name"] in names]
    missing = names - {m["name"] for m in mols}
    if missing:
        raise SystemExit(f"{path}: molecules {sorted(missing)} are not among this script's molecules")
    gflops = rows[0]["gemm_gflops"]
    annotate_flops(rows, mols, gflops)
    first = rows[0]
    meta = {"run_id": first["run_id"], "machine": first["machine"], "threads": first["threads"],
            "dtype": first["dtype"], "gemm_gflops": gflops}
    write_reports(rows, meta, path, plot_png)


if __name__ == "__main__":
    main()
