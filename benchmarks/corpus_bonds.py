"""Where do the corpus's thermal frames put the bonds, by kind of sampling?

For every molecule of the bundled corpus, the length of each covalent bond in each thermal frame
is compared with the same bond at the molecule's GFN2-xTB minimum, and the labels' mean bond
force along it is taken (half the difference of the two atoms' forces projected on the bond,
positive when the labels push the bond longer; see benchmarks/study_geometry.py). Both are
averaged per bond type and per kind of frame: MD at 300 and 600 K, normal-mode samples at 300,
600 and 1000 K.

The store keeps no sampling kind per record, so it is read from each molecule's block of records,
which the labeller writes in a fixed order (CORPUS.md): the minimum, 3 MD frames at 300 K, 3 at
600 K, then 5 normal-mode samples at each of 300, 600 and 1000 K. Only molecules with all 22
records (none dropped by the filters) are used.

    python benchmarks/corpus_bonds.py

Writes benchmarks/results/corpus_bonds.json and docs/figures/corpus_bonds.png (the mean stretch
of each bond type per kind of frame).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_geometry import bond_length_and_force, bonds_of  # noqa: E402

from forcecentric.data.store import Store  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.provenance import machine_info  # noqa: E402
from forcecentric.train.datamodule import resolve_path  # noqa: E402

#: each molecule's records in the bundled corpus, in the labeller's order
LAYOUT = ["minimum"] + ["md 300 K"] * 3 + ["md 600 K"] * 3 + ["nm 300 K"] * 5 + ["nm 600 K"] * 5 + ["nm 1000 K"] * 5
BOND_TYPES = ("C-H", "H-O", "H-N", "C-C", "C-O", "C-N")


def bond_shifts(minimum, frames, labels, acc) -> None:
    """Add each frame's (length - minimum's length, bond force) per bond to ``acc[label][type]``."""
    bonds = [(i, j, kind, bond_length_and_force(minimum, i, j)[0]) for i, j, kind in bonds_of(minimum)]
    for label, r in zip(labels, frames):
        for i, j, kind, dist0 in bonds:
            dist, force = bond_length_and_force(r, i, j)
            acc[label][kind].append((dist - dist0, force))


def summarize(acc) -> dict:
    out = {}
    for label, per_kind in acc.items():
        out[label] = {}
        for kind, values in sorted(per_kind.items()):
            x = np.asarray(values)
            out[label][kind] = {"n": int(len(x)), "stretch_mean_A": float(x[:, 0].mean()),
                                "stretch_std_A": float(x[:, 0].std()),
                                "bond_force_mean_meV_A": float(1000 * x[:, 1].mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="bundled:corpus")
    ap.add_argument("--out", default="benchmarks/results/corpus_bonds.json")
    ap.add_argument("--figure", default="docs/figures/corpus_bonds.png")
    args = ap.parse_args()
    store = Store(resolve_path(args.corpus))
    blocks: dict[str, list[int]] = defaultdict(list)
    for i, mol in enumerate(store.mol_ids()):
        blocks[str(mol)].append(i)
    acc: dict = defaultdict(lambda: defaultdict(list))
    used = 0
    for idx in blocks.values():
        if len(idx) != len(LAYOUT):
            continue
        recs = [store[i] for i in idx]
        if not recs[0].equilibrium or any(r.equilibrium for r in recs[1:]):
            continue
        used += 1
        bond_shifts(recs[0], recs[1:], LAYOUT[1:], acc)
    result = summarize(acc)
    order = [k for k in dict.fromkeys(LAYOUT[1:]) if k in result]
    for label in order:
        print(label, " | ".join(f"{k} {v['stretch_mean_A']:+.4f} A {v['bond_force_mean_meV_A']:+.0f} meV/A"
                                for k, v in result[label].items() if k in BOND_TYPES))
    write_json({"corpus": args.corpus, "molecules": len(blocks), "molecules_used": used, "layout": LAYOUT,
                "by_kind": result, "machine": machine_info()}, args.out)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in BOND_TYPES if all(k in result[label] for label in order)]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(order)
    for n, label in enumerate(order):
        ax.bar(np.arange(len(kinds)) + (n - (len(order) - 1) / 2) * width,
               [result[label][k]["stretch_mean_A"] for k in kinds], width, label=label)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_ylabel("mean bond length − minimum's (Å)")
    ax.set_title(f"bundled corpus: thermal frames by kind ({used} molecules)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
