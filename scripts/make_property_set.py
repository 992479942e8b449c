"""Build the bundled GFN2-xTB molecular-property set (HOMO, LUMO, gap, dipole).

    python scripts/make_property_set.py                       # all 1079 minima, 2 workers
    python scripts/make_property_set.py --limit 20 --out /tmp/props.extxyz

Takes the equilibrium records (the GFN2-xTB minima, one per molecule) of the bundled default
pre-training corpus (``src/forcecentric/bundled/corpus``), labels each geometry as it is with a
GFN2-xTB single point (:func:`forcecentric.data.label.label_properties`) and writes the
records atomically to an extended-XYZ file (default
``src/forcecentric/bundled/xtb_properties.extxyz``). SMILES come from
``bundled/corpus_molecules.smi`` (the corpus store does not keep them). The file is read back
with :func:`forcecentric.data.read_all` and compared with what was written before the script
reports success.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import forcecentric
from forcecentric.data import read_all
from forcecentric.data.label import label_properties, write_extxyz
from forcecentric.data.store import Store

BUNDLED = Path(forcecentric.__file__).parent / "bundled"
SOURCE = "forcecentric-xtb-properties"
PROPS = ("homo", "lumo", "gap", "mu", "dipole_x", "dipole_y", "dipole_z")


def corpus_smiles(path: Path) -> dict[str, str]:
    """``name -> SMILES`` from the corpus molecule list (``SMILES name`` per line, header)."""
    out = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].lower() != "smiles":
            out[fields[1]] = fields[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BUNDLED / "xtb_properties.extxyz")
    ap.add_argument("--corpus", type=Path, default=BUNDLED / "corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="label only the first N minima")
    args = ap.parse_args(argv)

    store = Store(args.corpus)
    eq = np.flatnonzero(store.equilibrium_flags())
    if args.limit is not None:
        eq = eq[: args.limit]
    smiles = corpus_smiles(BUNDLED / "corpus_molecules.smi")
    records = []
    for i in eq:
        conf = store[int(i)]
        if conf.mol_id in smiles and "smiles" not in conf.info:
            conf.info["smiles"] = smiles[conf.mol_id]
        records.append(conf)
    n_smiles = sum("smiles" in c.info for c in records)
    print(f"{len(records)} equilibrium records of {len(store)} in {args.corpus} "
          f"({len({c.mol_id for c in records})} molecules, {n_smiles} with SMILES)")

    t0 = time.perf_counter()
    failures: list[tuple[int, str, str]] = []
    labelled = label_properties(
        records, workers=args.workers, source=SOURCE, failures=failures, progress=True
    )
    wall = time.perf_counter() - t0
    print(f"labelled {len(labelled)} molecules in {wall:.1f} s wall with {args.workers} worker(s) "
          f"({len(labelled) / wall:.1f} molecules/s); {len(failures)} failed")
    for idx, name, reason in failures:
        print(f"  failed: record {idx} {name}: {reason}")

    path = write_extxyz(args.out, labelled, require_forces=False)

    # read back through the project's reader and compare
    back = read_all(path)
    if len(back) != len(labelled):
        raise SystemExit(f"{path}: read back {len(back)} records, wrote {len(labelled)}")
    for k, (a, c) in enumerate(zip(labelled, back)):
        assert np.array_equal(a.numbers, c.z), k
        assert np.allclose(a.positions, c.pos, atol=1e-7), k
        assert c.equilibrium is True and c.forces is None, k
        assert abs(c.energy - a.get_potential_energy()) < 1e-6, k
        assert c.mol_id == a.info["mol_id"] and c.source == SOURCE and c.charge == a.info["charge"], k
        assert c.level_of_theory == "GFN2-xTB", k
        for key in PROPS:
            assert isinstance(c.info[key], float) and abs(c.info[key] - a.info[key]) < 1e-9, (k, key)
        assert c.info.get("smiles") == a.info.get("smiles"), k

    print(f"wrote {path} ({path.stat().st_size} bytes); read back OK with forcecentric.data.read_all")
    table = {key: np.array([c.info[key] for c in back]) for key in PROPS}
    table["n_atoms"] = np.array([c.n_atoms for c in back])
    for key, v in table.items():
        print(f"  {key:9s} min {v.min():9.4f}  mean {v.mean():9.4f}  max {v.max():9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
