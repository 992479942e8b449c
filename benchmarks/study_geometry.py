"""Where do a study target's frames sit, and on whose potential-energy surface?

For each target of a study config that has a SMILES, this reads its training pool and its test
frames (the files `forcecentric study --phase prepare` wrote), the study's GFN2-xTB frames of the
same SMILES and any minima of the target (the xTB minima; the DFT minima of a `sampler: dft`
pool; a `dft_pool.xtb` target's own xTB frames and minima), and reports for every bond type
(element pair, bonds from covalent radii in the first frame):

* the mean and spread of the bond lengths (Å);
* the mean bond force ± its standard error (meV/Å): half the difference of the two atoms' forces
  projected on the bond, positive when the labels push the bond longer.

Frames drawn from the Boltzmann ensemble of their own labels' surface have a mean bond force of
only about -2kT/r (tens of meV/Å: the r² of the radial measure); a mean of hundreds of meV/Å
says the frames were sampled on another surface than the one that labelled them.

It also bins one torsion (--dihedral, default H-O-C-C, the hydroxyl rotor of an alcohol:
|angle| below 90° gauche, above 150° trans) and reports each set's share of every bin, and, for
fine-tuned models given with --models, their test force error within each bin: where in
conformational space a training pool leaves a model short. Writes
benchmarks/results/study_paper_geometry.json (or --out) and a histogram of one bond type's
lengths (--bond, default C-O) in each set of one molecule (--smiles, default CCO) to
docs/figures/study_paper_geometry.png (or --figure).

    python benchmarks/study_geometry.py -c study_paper \
        --models runs/study_paper/finetune/ethanol*/scratch/n50_seed*/model.ckpt
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from forcecentric.data import read_all
from forcecentric.data.conformation import matches
from forcecentric.evaluation import write_json
from forcecentric.provenance import machine_info
from forcecentric.study import _target_dir, load_study_config, xtb_dir


def bonds_of(record) -> list[tuple[int, int, str]]:
    """Covalent bonds (i, j, "A-B", elements in alphabetical order) of one frame: the labeller's bond
    test near a minimum (1.2 x the covalent radii)."""
    from forcecentric.data.label import _BOND_MULT_MINIMUM, _bond_set

    atoms = record.to_atoms()
    symbols = atoms.get_chemical_symbols()
    return [(i, j, "-".join(sorted((symbols[i], symbols[j])))) for i, j in sorted(_bond_set(atoms, _BOND_MULT_MINIMUM))]


def bond_length_and_force(record, i: int, j: int) -> tuple[float, float | None]:
    """Length of bond i-j (Å) and its bond force (eV/Å, None without forces): half the difference
    of the two atoms' forces projected on the bond, positive when the labels push it longer."""
    vec = record.pos[j] - record.pos[i]
    dist = float(np.linalg.norm(vec))
    if record.forces is None:
        return dist, None
    return dist, 0.5 * float((record.forces[j] - record.forces[i]) @ vec) / dist


def bond_statistics(records, bonds) -> dict[str, dict[str, float]]:
    """Per bond type: length mean and std (Å), and mean bond force and its standard error (meV/Å)
    over frames (each frame's value averaged over that type's bonds)."""
    lengths, forces = defaultdict(list), defaultdict(list)
    for r in records:
        per_len, per_force = defaultdict(list), defaultdict(list)
        for i, j, kind in bonds:
            dist, force = bond_length_and_force(r, i, j)
            per_len[kind].append(dist)
            if force is not None:
                per_force[kind].append(force)
        for kind in per_len:
            lengths[kind].append(np.mean(per_len[kind]))
            if per_force[kind]:
                forces[kind].append(np.mean(per_force[kind]))
    out = {}
    for kind in sorted(lengths):
        f = np.asarray(forces.get(kind, []))
        out[kind] = {
            "length_mean": float(np.mean(lengths[kind])),
            "length_std": float(np.std(lengths[kind])),
            "bond_force_mean_meV_A": float(1000 * f.mean()) if f.size else None,
            "bond_force_sem_meV_A": float(1000 * f.std() / np.sqrt(f.size)) if f.size > 1 else None,
        }
    return out


def dihedral_path(record, pattern: list[str]) -> tuple[int, int, int, int] | None:
    """The first chain of bonded atoms a-b-c-d whose elements are ``pattern`` (e.g. H, O, C, C: the
    hydroxyl torsion of an alcohol), or None."""
    bonded = defaultdict(set)
    for i, j, _ in bonds_of(record):
        bonded[i].add(j)
        bonded[j].add(i)
    symbols = record.to_atoms().get_chemical_symbols()
    for a in range(len(symbols)):
        if symbols[a] != pattern[0]:
            continue
        for b in sorted(bonded[a]):
            for c in sorted(bonded[b] - {a}):
                for d in sorted(bonded[c] - {a, b}):
                    if [symbols[b], symbols[c], symbols[d]] == pattern[1:]:
                        return a, b, c, d
    return None


def abs_dihedral(record, path) -> float:
    """|dihedral| in degrees, 0-180 (60: gauche, 180: trans)."""
    x = record.to_atoms().get_dihedral(*path)
    return float(min(x, 360.0 - x))


def region_errors(model_paths: list[str], test, labels: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Each model's force MAE (meV/Å) over the test frames and within each region ``labels`` marks."""
    import torch

    from forcecentric.checkpoint import load
    from forcecentric.evaluation import predict

    torch.set_num_threads(1)
    out = {}
    for path in model_paths:
        _, forces = predict(load(path), test)
        err = np.array([1000 * np.abs(f - r.forces).mean() for f, r in zip(forces, test)])
        out[path] = {"force_mae": float(err.mean()),
                     **{name: float(err[labels == k].mean()) for k, name in enumerate(names) if (labels == k).any()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="study_paper", help="study config (YAML file or preset name)")
    ap.add_argument("--out", default="benchmarks/results/study_paper_geometry.json", help="results JSON")
    ap.add_argument("--bond", default="C-O", help="bond type of the histogram")
    ap.add_argument("--smiles", default="CCO", help="the molecule whose sets the histogram shows")
    ap.add_argument("--figure", default="docs/figures/study_paper_geometry.png", help="the histogram (PNG)")
    ap.add_argument("--dihedral", default="H,O,C,C", help="elements of the torsion whose |angle| is binned")
    ap.add_argument("--dihedral-bins", type=float, nargs="+", default=[90.0, 150.0],
                    help="|dihedral| bin edges (deg) between 0 and 180: 0-90 gauche, 150-180 trans for H-O-C-C")
    ap.add_argument("--models", nargs="*", default=[],
                    help="fine-tuned models (model.ckpt) of the --smiles molecule whose test errors are split by "
                    "the torsion's bins (the test frames of the first target of that SMILES)")
    args = ap.parse_args()
    edges = [0.0, *args.dihedral_bins, 180.0001]
    bin_names = [f"|{args.dihedral.replace(',', '-')}| {edges[k]:.0f}-{min(edges[k + 1], 180):.0f}"
                 for k in range(len(edges) - 1)]
    first_test = None
    cfg = load_study_config(args.config)
    xtb_frames = [r for p in sorted(xtb_dir(cfg).glob("shard-*.extxyz")) for r in read_all(p)]
    sets: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for target, tc in cfg.targets.items():
        tdir = _target_dir(cfg, target)
        if not tc.smiles or not (tdir / "pool.extxyz").is_file():
            continue
        own = {"smiles": tc.smiles}
        xtb = [r for r in xtb_frames if matches(r, own)]
        named = {
            f"{target}: pool": read_all(tdir / "pool.extxyz"),
            f"{target}: test": read_all(tdir / "test.extxyz"),
            f"GFN2-xTB frames of {tc.smiles} (xTB labels)": [r for r in xtb if not r.equilibrium],
            f"GFN2-xTB minimum of {tc.smiles}": [r for r in xtb if r.equilibrium],
        }
        own_xtb = [r for p in sorted((tdir / "xtb").glob("shard-*.extxyz")) for r in read_all(p)]  # dft_pool.xtb
        if own_xtb:
            named[f"{target}: own GFN2-xTB frames (xTB labels)"] = [r for r in own_xtb if not r.equilibrium]
            for k, r in enumerate(r for r in own_xtb if r.equilibrium):
                named[f"{target}: own GFN2-xTB minimum {k}"] = [r]
        for path in sorted((tdir / "dft_sampler").glob("minimum-*.extxyz")):
            named[f"{target}: DFT minimum {path.stem.split('-')[1]}"] = read_all(path)
        if tc.smiles == args.smiles and first_test is None:
            first_test = named[f"{target}: test"]
        for name, records in named.items():
            if name in sets or not records:
                continue
            key = hashlib.sha1(np.concatenate([r.pos.ravel() for r in records]).tobytes()).hexdigest()
            if key in seen:  # the same frames as another target's (a shared test file)
                sets[seen[key]].setdefault("also", []).append(name)
                continue
            seen[key] = name
            bonds = bonds_of(records[0])
            path = dihedral_path(records[0], args.dihedral.split(","))
            fractions, angles = None, []
            if path is not None:
                angles = np.array([abs_dihedral(r, path) for r in records])
                fractions = dict(zip(bin_names, np.histogram(angles, bins=edges)[0].astype(float) / len(angles)))
            sets[name] = {
                "smiles": tc.smiles,
                "n_frames": len(records),
                "level_of_theory": sorted({r.level_of_theory for r in records}),
                "torsion_fractions": fractions,
                "bonds": bond_statistics(records, bonds),
                "_angles": [float(a) for a in angles],
                "_lengths": [float(np.mean([np.linalg.norm(r.pos[j] - r.pos[i]) for i, j, k in bonds
                                            if k == args.bond])) for r in records
                             if any(k == args.bond for _, _, k in bonds)],
            }
    out = Path(args.out)
    mine = {k: v for k, v in sets.items() if v["smiles"] == args.smiles}
    _plot({k: v["_lengths"] for k, v in mine.items()}, {k: v["_angles"] for k, v in mine.items()}, args.bond,
          args.dihedral.replace(",", "-"), Path(args.figure))
    for v in sets.values():
        del v["_lengths"], v["_angles"]
    models = {}
    if args.models and first_test is not None:
        path = dihedral_path(first_test[0], args.dihedral.split(","))
        labels = np.digitize([abs_dihedral(r, path) for r in first_test], edges[1:-1])
        models = region_errors(args.models, first_test, labels, bin_names)
    write_json({"config": args.config, "dihedral": args.dihedral, "sets": sets, "model_errors": models,
                "machine": machine_info()}, out)
    for name, v in sets.items():
        cells = []
        for kind, s in v["bonds"].items():
            force = s["bond_force_mean_meV_A"]
            f = "" if force is None or v["n_frames"] < 2 else f" F {force:+.0f}±{s['bond_force_sem_meV_A']:.0f}"
            cells.append(f"{kind} {s['length_mean']:.4f}±{s['length_std']:.4f}{f}")
        also = f" [= {', '.join(v['also'])}]" if v.get("also") else ""
        print(f"{name}{also} (n={v['n_frames']}): " + "; ".join(cells))
        if v["torsion_fractions"] and v["n_frames"] > 1:
            print("    " + ", ".join(f"{k}: {f:.2f}" for k, f in v["torsion_fractions"].items()))
    for path, errs in models.items():
        print(f"{path}: " + ", ".join(f"{k} {e:.1f}" for k, e in errs.items()) + " meV/A")
    print(f"wrote {out} and {args.figure}")


def _plot(lengths: dict[str, list[float]], angles: dict[str, list[float]], bond: str, torsion: str,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, values) in enumerate(lengths.items()):
        color = f"C{k % 10}"
        if len(values) == 1:
            ax.axvline(values[0], ls="--", lw=1, label=name, color=color)
            if angles.get(name):
                ax2.axvline(angles[name][0], ls="--", lw=1, color=color)
        elif values:
            ax.hist(values, bins=40, histtype="step", density=True, color=color,
                    label=f"{name} (mean {np.mean(values):.3f})")
            if len(angles.get(name, [])) > 1:
                ax2.hist(angles[name], bins=np.linspace(0, 180, 19), histtype="step", density=True, color=color)
    ax.set_xlabel(f"{bond} bond length (Å)")
    ax.set_ylabel("density")
    ax.legend(fontsize=6)
    ax2.set_xlabel(f"|{torsion}| torsion (degrees; 60 gauche, 180 trans)")
    ax2.set_ylabel("density")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
