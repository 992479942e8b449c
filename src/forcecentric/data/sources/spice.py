"""Reader for the SPICE HDF5 release (Eastman et al., Sci. Data 10, 11 (2023); versions 1.x and 2.x).

Layout: one group per molecule (name = PubChem id, SMILES or a DES370K/dipeptide name) with

* ``atomic_numbers`` [n_atoms];
* ``conformations`` [n_conf, n_atoms, 3] in **Bohr**;
* ``dft_total_energy`` [n_conf] in Hartree;
* ``dft_total_gradient`` [n_conf, n_atoms, 3] in Hartree/Bohr: a *gradient*, so
  ``forces = -gradient``;
* ``formation_energy`` [n_conf] (Hartree), ``mbis_charges`` [n_conf, n_atoms, 1] (e), multipoles,
  bond indices;
* ``smiles`` and ``subset``: byte strings in a dataset (an array of one).

Units are also written as ``units`` attributes of the datasets; when present they are honoured
(and an unknown unit is an error) rather than assumed. The total charge is the sum of the formal
charges of the SMILES (RDKit, with a plain SMILES parse as fallback). Level of theory:
wB97M-D3(BJ)/def2-TZVPPD. All conformers are off-equilibrium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..conformation import Conformation

LEVEL_OF_THEORY = "wB97M-D3(BJ)/def2-TZVPPD"


def _unit_table() -> dict[str, float]:
    import ase.units as u

    return {
        "bohr": u.Bohr, "angstrom": 1.0, "ang": 1.0, "nanometer": 10.0, "nm": 10.0,
        "hartree": u.Hartree, "ev": 1.0, "kcal/mol": u.kcal / u.mol, "kj/mol": u.kJ / u.mol,
        "hartree/bohr": u.Hartree / u.Bohr, "hartree/angstrom": u.Hartree, "ev/angstrom": 1.0,
        "kcal/mol/angstrom": u.kcal / u.mol, "elementary_charge": 1.0,
    }


def _scale(dataset, default: str, file: str, where: str) -> float:
    """Factor to eV / Angstrom from a dataset's ``units`` attribute (or the documented default)."""
    unit = dataset.attrs.get("units", default)
    if isinstance(unit, bytes):
        unit = unit.decode()
    unit = str(unit).strip().lower().replace(" ", "").replace("*", "")
    table = _unit_table()
    if unit not in table:
        raise DataError(f"{where}: unknown unit {unit!r} of {dataset.name!r}", file=file)
    return table[unit]


def _string(dataset) -> str:
    value = dataset[()]
    value = np.asarray(value)
    if value.shape != ():
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    else:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)


_BRACKET = re.compile(r"\[([^\]]*)\]")


def smiles_charge(smiles: str) -> int:
    """Total formal charge of a SMILES string (RDKit when it parses, else from bracket atoms)."""
    try:
        from rdkit import Chem, RDLogger

        RDLogger.DisableLog("rdApp.*")
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
        if mol is not None:
            return int(sum(a.GetFormalCharge() for a in mol.GetAtoms()))
    except ImportError:  # pragma: no cover - RDKit is a dependency
        pass
    total = 0
    for atom in _BRACKET.findall(smiles):
        body = atom.split(":")[0]
        m = re.search(r"(\++|-+)(\d*)$", body)
        if not m:
            continue
        signs, digits = m.group(1), m.group(2)
        value = int(digits) if digits else len(signs)
        total += value if signs[0] == "+" else -value
    return total


def read_spice(
    path: str | Path,
    *,
    source: str | None = None,
    level_of_theory: str | None = None,
    subsets: list[str] | None = None,
) -> Iterator[Conformation]:
    """Yield the conformers of a SPICE HDF5 file.

    Args:
        path: the ``.hdf5`` file.
        source: dataset name (default ``SPICE``).
        level_of_theory: default wB97M-D3(BJ)/def2-TZVPPD.
        subsets: keep only molecules whose ``subset`` contains one of these strings
            (case-insensitive), e.g. ``["PubChem", "DES370K"]``.
    """
    import h5py

    file = str(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"cannot be opened as HDF5: {exc}", file=file) from exc
    src = source or "SPICE"
    lot = level_of_theory or LEVEL_OF_THEORY
    wanted = [s.lower() for s in subsets] if subsets else None
    record = 0
    with h5:
        for name in h5:
            group = h5[name]
            if not isinstance(group, h5py.Group):
                continue
            where = f"group {name!r}"

            def fail(problem: str):
                raise DataError(f"{where}: {problem}", file=file, record=record)

            required = ("atomic_numbers", "conformations", "dft_total_energy")
            missing = [k for k in required if k not in group]
            if missing:
                fail(f"missing {missing} (SPICE layout); datasets: {sorted(group.keys())}")
            subset = _string(group["subset"]) if "subset" in group else ""
            if wanted is not None and not any(w in subset.lower() for w in wanted):
                continue
            z = np.asarray(group["atomic_numbers"][()]).astype(np.int64).reshape(-1)
            pos = np.asarray(group["conformations"][()], dtype=np.float64)
            pos = pos * _scale(group["conformations"], "bohr", file, where)
            if pos.ndim != 3 or pos.shape[1:] != (z.shape[0], 3):
                fail(f"conformations have shape {pos.shape} but there are {z.shape[0]} atomic numbers")
            n_conf = pos.shape[0]
            energy = np.asarray(group["dft_total_energy"][()], dtype=np.float64).reshape(-1)
            energy = energy * _scale(group["dft_total_energy"], "hartree", file, where)
            if energy.shape[0] != n_conf:
                fail(f"dft_total_energy has {energy.shape[0]} values for {n_conf} conformations")
            forces = None
            if "dft_total_gradient" in group:
                grad = np.asarray(group["dft_total_gradient"][()], dtype=np.float64)
                if grad.shape != pos.shape:
                    fail(f"dft_total_gradient has shape {grad.shape} but conformations have shape {pos.shape}")
                forces = -grad * _scale(group["dft_total_gradient"], "hartree/bohr", file, where)
            formation = None
            if "formation_energy" in group:
                formation = np.asarray(group["formation_energy"][()], dtype=np.float64).reshape(-1)
                formation = formation * _scale(group["formation_energy"], "hartree", file, where)
                if formation.shape[0] != n_conf:
                    formation = None
            charges = None
            if "mbis_charges" in group:
                charges = np.asarray(group["mbis_charges"][()], dtype=np.float64)
                charges = charges.reshape(charges.shape[0], -1) if charges.ndim >= 2 else None
                if charges is not None and charges.shape != (n_conf, z.shape[0]):
                    charges = None
            smiles = _string(group["smiles"]) if "smiles" in group else ""
            charge = smiles_charge(smiles) if smiles else 0
            for c in range(n_conf):
                info = {"group": name, "conformer": c, "subset": subset, "smiles": smiles}
                if formation is not None and np.isfinite(formation[c]):
                    info["formation_energy"] = float(formation[c])
                if charges is not None:
                    info["mbis_charges"] = charges[c].copy()
                yield Conformation(
                    z=z, pos=pos[c], energy=energy[c], forces=None if forces is None else forces[c],
                    charge=charge, equilibrium=False, source=src, level_of_theory=lot, mol_id=name, info=info,
                )
                record += 1
