"""How many of its molecules' conformers does the pre-training corpus see?

The bundled corpus was labelled with one GFN2-xTB minimum per molecule, the first of RDKit's
ETKDG conformers (in embedding order) to converge, and every thermal frame of a molecule sits
around that minimum. For a sample of the corpus's molecules this measures what that leaves out:

* distinct MMFF94 minima among 9 and among 50 ETKDG conformers (the labeller's screen,
  :func:`forcecentric.data.label.rank_conformers`);
* distinct GFN2-xTB minima the labeller finds when asked for up to 3, in embedding order
  (9 conformers, as ``--screen 0``) and with the MMFF screen (``--screen 50``, the default of
  ``forcecentric label``), with the optimizations each took (wall time, one thread);
* for the screened minima: their GFN2-xTB energies above the lowest, and how far the corpus's
  own minimum of the molecule lies above the lowest one found.

    python benchmarks/corpus_conformers.py [--n-molecules 40]

Writes benchmarks/results/corpus_conformers.json (every molecule and the summary). Molecules are
taken evenly spaced through the corpus list (``bundled:corpus_molecules``), so the sample follows
its mix of sizes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402

from forcecentric.data import label  # noqa: E402
from forcecentric.data.store import Store  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.provenance import machine_info  # noqa: E402
from forcecentric.train.datamodule import resolve_path  # noqa: E402

KT_300K = 0.02585  # eV


def corpus_minima(smiles: dict[str, str]) -> dict[str, tuple[float, set[str]]]:
    """GFN2-xTB energy (eV) of the corpus's equilibrium record of each named molecule, and its
    stereoisomer and that one's mirror image (isomeric SMILES read from the geometry; the same
    string twice for an achiral one), since mirror images have the same energies."""
    store = Store(resolve_path("bundled:corpus"))
    ids, eq = store.mol_ids(), store.equilibrium_flags()
    out = {}
    for i in np.flatnonzero(eq):
        name = str(ids[i])
        if name in smiles:
            rec = store[int(i)]
            atoms = Atoms(numbers=rec.z, positions=rec.pos, info={"mol_id": name})
            mirror = Atoms(numbers=rec.z, positions=rec.pos * [-1.0, 1.0, 1.0], info={"mol_id": name})
            isomers = {label.stereo_smiles(a, smiles[name]) for a in (atoms, mirror)}
            out[name] = (float(rec.energy), isomers)
    return out


def one_molecule(name: str, smiles: str, seed: int) -> dict:
    row: dict = {"name": name, "smiles": smiles}
    for n in (9, 50):
        distinct, _ = label.rank_conformers(label.embed(smiles, n, seed, name=name))
        row[f"mmff_minima_{n}"] = len(distinct)
    for key, kwargs in (("embedding_order", {"n_screen": 0}), ("screened", {"n_screen": 50})):
        t0 = time.perf_counter()
        minima = label.label_molecule(name, smiles, n_conformers=3, md_frames_per_T=0, n_normal_mode=0,
                                      seed=seed, **kwargs)
        energies = sorted(m.get_potential_energy() for m in minima)
        row[key] = {"xtb_minima": len(minima), "wall_s": round(time.perf_counter() - t0, 2),
                    "lowest_energy_eV": energies[0],
                    "energies_above_lowest_eV": [round(e - energies[0], 4) for e in energies],
                    "stereoisomers": sorted({label.stereo_smiles(m) for m in minima})}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-molecules", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "corpus_conformers.json"))
    args = p.parse_args()
    lines = resolve_path("bundled:corpus_molecules").read_text().splitlines()[1:]
    pairs = [tuple(line.split()[::-1]) for line in lines if line.strip()]
    step = max(1, len(pairs) // args.n_molecules)
    sample = pairs[::step][: args.n_molecules]
    corpus = corpus_minima(dict(sample))
    rows = []
    t0 = time.perf_counter()
    for k, (name, smiles) in enumerate(sample):
        try:
            row = one_molecule(name, smiles, args.seed)
        except Exception as exc:  # a failed molecule is recorded, not fatal
            rows.append({"name": name, "smiles": smiles, "error": f"{type(exc).__name__}: {exc}"})
            continue
        scr = row["screened"]
        if name in corpus:  # the corpus's minimum against the lowest either search found
            energy, isomers = corpus[name]
            row["corpus_stereoisomer"] = sorted(isomers)[0]
            found = {*scr["stereoisomers"], *row["embedding_order"]["stereoisomers"]}
            if len(found) == 1 and found <= isomers:  # the same one, or its mirror image
                lowest = min(energy, scr["lowest_energy_eV"], row["embedding_order"]["lowest_energy_eV"])
                row["corpus_minimum_above_lowest_eV"] = round(energy - lowest, 4)
            # else: a diastereomer (the corpus drew open stereo at random), so no comparison
        rows.append(row)
        print(f"[{k + 1}/{len(sample)}] {name} {smiles}: MMFF {row['mmff_minima_9']}/{row['mmff_minima_50']}, "
              f"xTB {row['embedding_order']['xtb_minima']} -> {scr['xtb_minima']} "
              f"({row['embedding_order']['wall_s']} -> {scr['wall_s']} s)", flush=True)
    ok = [r for r in rows if "error" not in r]

    comparable = [r for r in ok if "corpus_minimum_above_lowest_eV" in r]  # same stereoisomer as the corpus

    def share(pred) -> float:
        return round(sum(1 for r in ok if pred(r)) / max(1, len(ok)), 3)

    summary = {
        "n_molecules": len(rows),
        "n_failed": len(rows) - len(ok),
        "median_mmff_minima_9": float(np.median([r["mmff_minima_9"] for r in ok])),
        "median_mmff_minima_50": float(np.median([r["mmff_minima_50"] for r in ok])),
        "share_with_several_mmff_minima_50": share(lambda r: r["mmff_minima_50"] > 1),
        "mean_xtb_minima_embedding_order": round(float(np.mean([r["embedding_order"]["xtb_minima"] for r in ok])), 2),
        "mean_xtb_minima_screened": round(float(np.mean([r["screened"]["xtb_minima"] for r in ok])), 2),
        "share_with_more_minima_screened": share(lambda r: r["screened"]["xtb_minima"] > r["embedding_order"]["xtb_minima"]),
        "share_with_a_second_minimum_within_4kT": share(
            lambda r: len(r["screened"]["energies_above_lowest_eV"]) > 1
            and r["screened"]["energies_above_lowest_eV"][1] < 4 * KT_300K),
        "n_corpus_minimum_comparable": len(comparable),
        "n_corpus_minimum_other_stereoisomer": sum(1 for r in ok if "corpus_stereoisomer" in r) - len(comparable),
        "share_corpus_minimum_above_lowest_by_over_kT": round(
            sum(1 for r in comparable if r["corpus_minimum_above_lowest_eV"] > KT_300K) / max(1, len(comparable)), 3),
        "wall_s_embedding_order": round(sum(r["embedding_order"]["wall_s"] for r in ok), 1),
        "wall_s_screened": round(sum(r["screened"]["wall_s"] for r in ok), 1),
        "wall_s_total": round(time.perf_counter() - t0, 1),
    }
    write_json({"summary": summary, "settings": {"n_conformers": 3, "n_embed": 9, "n_screen": 50, "seed": args.seed,
                                                  "kT_300K_eV": KT_300K},
                "machine": machine_info(), "molecules": rows}, args.out)
    print(summary)


if __name__ == "__main__":
    main()
