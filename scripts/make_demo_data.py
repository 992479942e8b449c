#!/usr/bin/env python
"""Build the bundled GFN2-xTB demo data sets of forcecentric (deterministic, fixed seeds).

    python scripts/make_demo_data.py            # writes src/forcecentric/bundled/*

Writes, in the output directory (default ``src/forcecentric/bundled``):

``demo_pretrain.extxyz``
    Pre-training corpus: small organic molecules (H, C, N, O, F, S, Cl), each with up to three
    distinct GFN2-xTB minima (``equilibrium=True``), Langevin MD frames at 300/600/900 K and
    normal-mode samples at 300/500 K (``equilibrium=False``).
``demo_target.extxyz``
    Held-out fine-tuning / evaluation molecule, aspirin (not in the pre-training set):
    off-equilibrium frames only, from MD at 300 and 500 K plus a few normal-mode samples.
``README.md``
    The data card, with the counts and force statistics of the files just written.

Both extxyz files are read back and compared with what was written before the script reports
success. Labelling runs in ``--workers`` processes with one OpenMP thread each.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before tblite is loaded in this process

import ase.io  # noqa: E402
from ase.data import chemical_symbols  # noqa: E402

from forcecentric.data.label import (  # noqa: E402
    INFO_KEYS,
    label_molecules,
    write_extxyz,
)

SEED = 2024
SOURCE = "forcecentric-xtb-demo"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "forcecentric" / "bundled"

#: Held-out target molecule (never in the pre-training list).
TARGET = ("aspirin", "CC(=O)Oc1ccccc1C(=O)O")

#: Pre-training molecules: (name, SMILES). Small, neutral, closed-shell, H C N O F S Cl.
PRETRAIN_MOLECULES: list[tuple[str, str]] = [
    # alcohols, ethers, carbonyls, acids, esters
    ("methanol", "CO"),
    ("ethanol", "CCO"),
    ("propan-1-ol", "CCCO"),
    ("propan-2-ol", "CC(C)O"),
    ("ethylene_glycol", "OCCO"),
    ("dimethyl_ether", "COC"),
    ("acetaldehyde", "CC=O"),
    ("acetone", "CC(C)=O"),
    ("formic_acid", "O=CO"),
    ("acetic_acid", "CC(=O)O"),
    ("propanoic_acid", "CCC(=O)O"),
    ("methyl_acetate", "COC(C)=O"),
    ("malonaldehyde", "C(/O)=C/C=O"),  # Z-enol (the H-bonded form); no backslash for extxyz
    ("butan-1-ol", "CCCCO"),
    ("2-methoxyethanol", "COCCO"),
    ("glycerol", "OCC(O)CO"),
    ("diethyl_ether", "CCOCC"),
    ("propanal", "CCC=O"),
    ("ethyl_acetate", "CCOC(C)=O"),
    # nitrogen
    ("formamide", "NC=O"),
    ("acetamide", "CC(N)=O"),
    ("n-methylacetamide", "CNC(C)=O"),
    ("urea", "NC(N)=O"),
    ("methylamine", "CN"),
    ("ethylamine", "CCN"),
    ("propan-1-amine", "CCCN"),
    ("dimethylamine", "CNC"),
    ("acetonitrile", "CC#N"),
    ("nitromethane", "C[N+](=O)[O-]"),
    ("glycine", "NCC(=O)O"),
    ("alanine", "CC(N)C(=O)O"),
    ("serine", "NC(CO)C(=O)O"),
    # hydrocarbons
    ("butane", "CCCC"),
    ("cyclohexane", "C1CCCCC1"),
    ("benzene", "c1ccccc1"),
    ("toluene", "Cc1ccccc1"),
    ("naphthalene", "c1ccc2ccccc2c1"),
    # substituted benzenes
    ("phenol", "Oc1ccccc1"),
    ("benzyl_alcohol", "OCc1ccccc1"),
    ("aniline", "Nc1ccccc1"),
    ("anisole", "COc1ccccc1"),
    ("benzaldehyde", "O=Cc1ccccc1"),
    ("benzoic_acid", "OC(=O)c1ccccc1"),
    ("salicylic_acid", "OC(=O)c1ccccc1O"),
    ("paracetamol", "CC(=O)Nc1ccc(O)cc1"),
    # heteroaromatics
    ("pyridine", "c1ccncc1"),
    ("pyrimidine", "c1cncnc1"),
    ("pyrrole", "c1cc[nH]c1"),
    ("imidazole", "c1c[nH]cn1"),
    ("furan", "c1ccoc1"),
    ("uracil", "O=c1cc[nH]c(=O)[nH]1"),
    ("thymine", "Cc1c[nH]c(=O)[nH]c1=O"),
    # fluorine
    ("fluorobenzene", "Fc1ccccc1"),
    ("4-fluorophenol", "Oc1ccc(F)cc1"),
    ("2,2,2-trifluoroethanol", "OCC(F)(F)F"),
    ("2-fluoroethanol", "OCCF"),
    # sulfur
    ("thiophene", "c1ccsc1"),
    ("methanethiol", "CS"),
    ("ethanethiol", "CCS"),
    ("dimethyl_sulfide", "CSC"),
    ("dimethyl_sulfoxide", "CS(C)=O"),
    # chlorine
    ("chloroform", "ClC(Cl)Cl"),
    ("dichloromethane", "ClCCl"),
    ("chlorobenzene", "Clc1ccccc1"),
    ("chloroacetic_acid", "OC(=O)CCl"),
    ("2-chloroethanol", "OCCCl"),
]

#: Pre-training settings (per molecule): up to 3 distinct minima; 2 MD frames at each of
#: 300/600/900 K and 1 normal-mode sample at each of 300/500 K, spread over the minima.
PRETRAIN_SETTINGS = dict(
    n_conformers=3,
    n_embed=9,
    md_frames_per_T=2,
    temperatures=(300.0, 600.0, 900.0),
    n_normal_mode=1,
    normal_mode_temperatures=(300.0, 500.0),
    interval_steps=40,
    equilibration_steps=200,
    timestep_fs=0.5,
    friction_per_fs=0.02,
    fmax=0.01,
    max_force=10.0,
    min_distance=0.5,
    min_wavenumber=100.0,
)

#: Target settings: two minima as MD starting points, 190 MD frames per temperature (spaced
#: 40 steps = 20 fs apart), 10 normal-mode samples per temperature.
TARGET_SETTINGS = dict(
    PRETRAIN_SETTINGS,
    n_conformers=2,
    n_embed=6,
    md_frames_per_T=190,
    temperatures=(300.0, 500.0),
    n_normal_mode=10,
    normal_mode_temperatures=(300.0, 500.0),
)


def _check_round_trip(path: Path, written: list) -> list:
    back = ase.io.read(path, ":")
    if len(back) != len(written):
        raise SystemExit(f"{path}: wrote {len(written)} records, read back {len(back)}")
    for i, (a, b) in enumerate(zip(written, back)):
        ok = (
            np.array_equal(a.numbers, b.numbers)
            and np.allclose(a.positions, b.positions, atol=1e-7)
            and np.isclose(a.get_potential_energy(), b.get_potential_energy(), rtol=0, atol=1e-9)
            and np.allclose(a.get_forces(), b.get_forces(), atol=1e-7)
            and all(a.info[k] == b.info[k] for k in INFO_KEYS)
            and isinstance(b.info["equilibrium"], (bool, np.bool_))
        )
        if not ok:
            raise SystemExit(f"{path}: record {i} does not round-trip through extxyz")
    return back


def summarize(records: list) -> dict:
    """Counts and force statistics of a list of labelled records."""
    eq = [r for r in records if r.info["equilibrium"]]
    off = [r for r in records if not r.info["equilibrium"]]
    atom_counts: Counter = Counter()
    conf_counts: Counter = Counter()
    for r in records:
        syms = r.get_chemical_symbols()
        atom_counts.update(syms)
        conf_counts.update(set(syms))
    order = sorted(atom_counts, key=chemical_symbols.index)
    per_mol: dict[str, Counter] = defaultdict(Counter)
    n_atoms: dict[str, int] = {}
    for r in records:
        per_mol[r.info["mol_id"]][r.info["sampling"]] += 1
        n_atoms[r.info["mol_id"]] = len(r)
    per_kind: Counter = Counter(
        f"{r.info['sampling']}@{r.info['temperature_K']:g}K" for r in records
    )

    def fstats(rs):
        if not rs:
            return None
        f = np.concatenate([r.get_forces().ravel() for r in rs])
        norms = np.concatenate([np.linalg.norm(r.get_forces(), axis=1) for r in rs])
        return dict(
            rms_component=float(np.sqrt(np.mean(f**2))),
            max_abs_component=float(np.abs(f).max()),
            mean_atom_norm=float(norms.mean()),
            max_atom_norm=float(norms.max()),
        )

    return dict(
        n_conformations=len(records),
        n_equilibrium=len(eq),
        n_off_equilibrium=len(off),
        n_atoms_total=int(sum(len(r) for r in records)),
        atoms_per_element={s: atom_counts[s] for s in order},
        conformations_with_element={s: conf_counts[s] for s in order},
        per_kind=dict(sorted(per_kind.items())),
        per_molecule={
            m: dict(n_atoms=n_atoms[m], **{k: c[k] for k in ("minimum", "md", "normal_mode")})
            for m, c in per_mol.items()
        },
        forces_off_equilibrium=fstats(off),
        forces_equilibrium=fstats(eq),
    )


def _fmt_forces(fs: dict | None) -> str:
    if fs is None:
        return "n/a"
    return (
        f"RMS component {fs['rms_component']:.3f} eV/Å, max |component| "
        f"{fs['max_abs_component']:.3f} eV/Å, mean per-atom |F| {fs['mean_atom_norm']:.3f} eV/Å, "
        f"max per-atom |F| {fs['max_atom_norm']:.3f} eV/Å"
    )


def write_card(path: Path, pre: dict, tgt: dict, sizes: dict, meta: dict) -> None:
    """Write the data card (README.md) from the statistics of the files just written."""

    def elem_table(st: dict) -> str:
        rows = ["| element | atoms | conformations containing it |", "|---|---:|---:|"]
        for s, n in st["atoms_per_element"].items():
            rows.append(f"| {s} | {n} | {st['conformations_with_element'][s]} |")
        return "\n".join(rows)

    def kind_table(st: dict) -> str:
        rows = ["| sampling @ temperature | conformations |", "|---|---:|"]
        rows += [f"| {k} | {n} |" for k, n in st["per_kind"].items()]
        return "\n".join(rows)

    smiles = dict(PRETRAIN_MOLECULES)
    mol_rows = [
        "| molecule | SMILES | atoms | minima (eq) | MD | normal-mode |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m, c in pre["per_molecule"].items():
        mol_rows.append(
            f"| {m} | `{smiles[m]}` | {c['n_atoms']} | {c['minimum']} | {c['md']} | "
            f"{c['normal_mode']} |"
        )
    ps, ts = PRETRAIN_SETTINGS, TARGET_SETTINGS
    text = f"""# Bundled demo data (GFN2-xTB)

Two small labelled data sets shipped with `forcecentric` so that the demo, the tests and the
tutorials run offline in minutes. They are a *demonstration* of the force-centric pipeline
(pre-train on many molecules, fine-tune/evaluate on a held-out one), not a benchmark.

| file | conformations | equilibrium | off-equilibrium | molecules | bytes |
|---|---:|---:|---:|---:|---:|
| `demo_pretrain.extxyz` | {pre['n_conformations']} | {pre['n_equilibrium']} | {pre['n_off_equilibrium']} | {len(pre['per_molecule'])} | {sizes['demo_pretrain.extxyz']} |
| `demo_target.extxyz` | {tgt['n_conformations']} | {tgt['n_equilibrium']} | {tgt['n_off_equilibrium']} | {len(tgt['per_molecule'])} | {sizes['demo_target.extxyz']} |

## How they were made

```
python scripts/make_demo_data.py
```

The script is deterministic (fixed seed {SEED}; per-molecule random streams derived from the
seed and the molecule name; one OpenMP thread per worker). It took {meta['wall_s']:.0f} s of wall
time with {meta['workers']} worker processes on {meta['machine']}. Code:
`forcecentric.data.label` (`label_molecules`, `write_extxyz`).

Per molecule:

1. RDKit ETKDGv3 embedding (hydrogens added, random seed), MMFF94 pre-optimization. Stereochemistry
   the SMILES leaves open is fixed to one stereoisomer for all of a molecule's conformers.
2. GFN2-xTB geometry optimization (ASE BFGS, `fmax` = {ps['fmax']} eV/Å, ≤ 500 steps) of up to
   {ps['n_embed']} embedded conformers until {ps['n_conformers']} *distinct* minima are found
   (duplicates — same sorted interatomic distances within 0.05 Å and energy within 2 meV — are
   dropped, so rigid molecules have one minimum). Optimizations in which the covalent bond
   graph changes (fragmentation, rearrangement) are rejected. Minima are stored with
   `equilibrium=True`, `sampling="minimum"`, `temperature_K=0`; their recorded forces are the
   near-zero GFN2-xTB forces (max atomic |F| < {ps['fmax']} eV/Å), not meant as force labels.
3. Langevin MD with GFN2-xTB (ASE `Langevin`, time step {ps['timestep_fs']} fs, friction
   {ps['friction_per_fs']} fs⁻¹, centre of mass fixed, Maxwell–Boltzmann start): at each
   temperature, {ps['equilibration_steps']} equilibration steps are discarded, then frames are
   kept every {ps['interval_steps']} steps ({ps['interval_steps'] * ps['timestep_fs']:g} fs). The
   frames of one temperature are spread over the minima, each minimum running its own
   trajectory. `sampling="md"`.
4. Normal-mode sampling as in ANI-1 (Smith, Isayev & Roitberg, *Chem. Sci.* 2017): GFN2-xTB
   Hessian by central differences (ASE `Vibrations`, 0.01 Å), rigid modes projected out;
   displacement `R_i = ± sqrt(3 c_i N_a k_B T / K_i)` along each mode with random `c_i`
   (`Σ c_i ~ U(0, 1)`), mode frequencies floored at {ps['min_wavenumber']:g} cm⁻¹.
   `sampling="normal_mode"`.
5. Filter: frames with a force component above {ps['max_force']:g} eV/Å, two atoms closer than
   {ps['min_distance']} Å, or a dissociated molecule are dropped (dropped here:
   {meta['n_dropped']}).

Settings — pre-training: {ps['md_frames_per_T']} MD frames per molecule at each of
{', '.join(f'{t:g}' for t in ps['temperatures'])} K and {ps['n_normal_mode']} normal-mode sample(s)
per molecule at each of {', '.join(f'{t:g}' for t in ps['normal_mode_temperatures'])} K.
Target (aspirin): {ts['n_conformers']} minima as starting points,
{ts['md_frames_per_T']} MD frames at each of {', '.join(f'{t:g}' for t in ts['temperatures'])} K
(frames {ts['interval_steps'] * ts['timestep_fs']:g} fs apart, {ts['n_conformers'] * len(ts['temperatures'])} independent trajectories of
~{ts['md_frames_per_T'] // ts['n_conformers'] * ts['interval_steps'] * ts['timestep_fs'] / 1000:.1f} ps),
{ts['n_normal_mode']} normal-mode samples at each of
{', '.join(f'{t:g}' for t in ts['normal_mode_temperatures'])} K; the aspirin minima themselves are
not included (the target file is off-equilibrium only).

## Level of theory and units

- GFN2-xTB (Bannwarth, Ehlert & Grimme, *JCTC* 2019) via tblite {meta['tblite']} (ASE
  calculator `tblite.ase.TBLite`, accuracy 1.0, electronic temperature 300 K), gas phase,
  neutral closed-shell molecules. RDKit {meta['rdkit']}, ASE {meta['ase']}.
- Units: energy eV (total GFN2-xTB energy, no atomic references subtracted), positions Å,
  forces eV/Å. Energies are consistent within these two files (same method and settings).

## Format

Extended XYZ, read with `ase.io.read(path, ":")`. Energy and forces are attached as a
`SinglePointCalculator` (`atoms.get_potential_energy()`, `atoms.get_forces()`). `atoms.info`:

| key | type | meaning |
|---|---|---|
| `equilibrium` | bool | `True` for optimized minima, `False` for thermal samples |
| `source` | str | `"{SOURCE}"` |
| `mol_id` | str | molecule name (table below) |
| `smiles` | str | SMILES the molecule was built from |
| `level_of_theory` | str | `"GFN2-xTB"` |
| `charge` | int | total charge (0 for all molecules here) |
| `sampling` | str | `"minimum"`, `"md"` or `"normal_mode"` |
| `temperature_K` | float | MD / normal-mode temperature, 0 for minima |

## Held-out molecule

**Aspirin** (`{TARGET[1]}`, 21 atoms) is the fine-tuning / evaluation molecule and is
**excluded from the pre-training set** (`tests/test_label.py` checks that the two files share no
molecule). Related fragments do occur in pre-training (salicylic acid, benzoic acid, methyl
acetate, paracetamol), as they would in a real pre-training corpus.

## demo_pretrain.extxyz

{pre['n_conformations']} conformations ({pre['n_equilibrium']} equilibrium =
{100 * pre['n_equilibrium'] / pre['n_conformations']:.1f} %, {pre['n_off_equilibrium']}
off-equilibrium), {pre['n_atoms_total']} atoms, {len(pre['per_molecule'])} molecules.

Forces, off-equilibrium frames: {_fmt_forces(pre['forces_off_equilibrium'])}.
Forces, minima: {_fmt_forces(pre['forces_equilibrium'])}.

{kind_table(pre)}

{elem_table(pre)}

{chr(10).join(mol_rows)}

## demo_target.extxyz

{tgt['n_conformations']} aspirin conformations, all off-equilibrium ({tgt['n_atoms_total']} atoms).

Forces: {_fmt_forces(tgt['forces_off_equilibrium'])}.

{kind_table(tgt)}

{elem_table(tgt)}

## Limitations

- GFN2-xTB is a semi-empirical tight-binding method: good geometries and qualitatively right
  forces, not DFT accuracy. Models trained here should be compared with GFN2-xTB, not with
  experiment or with MD17's DFT labels.
- The corpus is tiny (a few hundred conformations of {len(pre['per_molecule'])} molecules) and
  MD trajectories are short; it demonstrates the workflow and exercises the code, nothing more.
- Neutral, closed-shell, gas-phase molecules only; elements H, C, N, O, F, S, Cl.

License: generated data, released with the package under its MIT license.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-card", action="store_true", help="do not rewrite README.md")
    args = parser.parse_args(argv)

    names = [n for n, _ in PRETRAIN_MOLECULES]
    assert TARGET[0] not in names and TARGET[1] not in dict(PRETRAIN_MOLECULES).values()

    t0 = time.perf_counter()
    dropped: list = []
    # Aspirin first: it is the longest job, so the other worker works through the small ones.
    molecules = [(TARGET[0], TARGET[1], TARGET_SETTINGS)] + list(PRETRAIN_MOLECULES)
    records, failures = label_molecules(
        molecules, seed=SEED, n_workers=args.workers, dropped=dropped, source=SOURCE,
        **PRETRAIN_SETTINGS,
    )
    wall = time.perf_counter() - t0
    if failures:
        for name, reason in failures:
            print(f"FAILED {name}: {reason}", file=sys.stderr)
        return 1
    for d in dropped:
        print("dropped: %s %s %g K: %s" % d)

    target = [r for r in records if r.info["mol_id"] == TARGET[0] and not r.info["equilibrium"]]
    pretrain = [r for r in records if r.info["mol_id"] != TARGET[0]]
    assert not {r.info["mol_id"] for r in pretrain} & {r.info["mol_id"] for r in target}

    out = args.out_dir
    files = {"demo_pretrain.extxyz": pretrain, "demo_target.extxyz": target}
    sizes = {}
    for fname, recs in files.items():
        path = write_extxyz(out / fname, recs)
        _check_round_trip(path, recs)
        sizes[fname] = path.stat().st_size

    pre, tgt = summarize(pretrain), summarize(target)
    meta = dict(
        wall_s=wall,
        workers=args.workers,
        machine=f"{platform.machine()} Linux, {os.cpu_count()} CPU cores",
        n_dropped=len(dropped),
        tblite=importlib.metadata.version("tblite"),
        rdkit=importlib.metadata.version("rdkit"),
        ase=importlib.metadata.version("ase"),
    )
    if not args.no_card:
        write_card(out / "README.md", pre, tgt, sizes, meta)

    n_total = len(records)
    print(json.dumps({"pretrain": pre, "target": tgt}, indent=1))
    print(f"labelled {n_total} conformations ({len(pretrain)} pre-training incl. "
          f"{pre['n_equilibrium']} minima, {len(target)} target; aspirin minima not written)")
    print(f"sizes: {sizes} (total {sum(sizes.values())} bytes)")
    print(f"dropped frames: {len(dropped)}")
    print(f"wall time {wall:.1f} s with {args.workers} workers = "
          f"{n_total / (wall * args.workers):.2f} conformations per core-second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
