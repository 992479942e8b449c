"""Reader for QM9 (Ramakrishnan et al., Sci. Data 1, 140022 (2014)) in its common layouts.

Layouts:

* the original release (``dsgdb9nsd.xyz.tar.bz2``): one ``dsgdb9nsd_NNNNNN.xyz`` per molecule —
  line 1 the atom count; line 2 ``gdb IDX A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv``
  (tab-separated); one line per atom ``symbol x y z mulliken_charge``; then the harmonic
  frequencies, the GDB-17 and relaxed SMILES, and the two InChI strings. Numbers may use
  Mathematica exponents (``1.2*^-6``). Read one file, a directory of them, or the tar archive.
* the SDF + CSV layout (MoleculeNet / PyG ``gdb9.sdf`` + ``gdb9.sdf.csv``): geometries from the
  SDF (read unsanitized with hydrogens), properties from the CSV (columns ``mol_id, A, B, C, mu,
  alpha, homo, lumo, gap, r2, zpve, u0, u298, h298, g298, cv, u0_atom, u298_atom, h298_atom,
  g298_atom``), matched by ``mol_id`` (``gdb_N``, the SDF title) or by order.
* extended XYZ with the properties in ``atoms.info`` in original QM9 units (e.g. metatrain's
  ``qm9_reduced_100.xyz``: ``A B C mu alpha epsHOMO epsLUMO epsgap <R2> zpve U0 U H G Cv``).
* schnetpack 0.3's ASE database (``row.data``: ``rotational_constant_A`` ... ``energy_U0`` ...
  ``heat_capacity``), stored in ASE units: energies and orbital energies in eV, ``dipole_moment``
  in e*Angstrom, ``isotropic_polarizability`` in Angstrom^3, ``electronic_spatial_extent`` in
  Angstrom^2 (converted back to Debye, a0^3 and a0^2 here).

Every record is an equilibrium structure (B3LYP/6-31G(2df,p) minimum) with ``energy`` = U0 (total
energy at 0 K, eV) and no forces. All properties go to ``Conformation.info`` under the canonical
names of :data:`QM9_UNITS`, converted to the units listed there.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..conformation import Conformation

LEVEL_OF_THEORY = "B3LYP/6-31G(2df,p)"

#: Units of the properties in ``Conformation.info`` of QM9 records (after conversion).
QM9_UNITS: dict[str, str] = {
    "A": "GHz",            # rotational constants
    "B": "GHz",
    "C": "GHz",
    "mu": "Debye",         # dipole moment
    "alpha": "a0^3",       # isotropic polarizability (Bohr^3)
    "homo": "eV",
    "lumo": "eV",
    "gap": "eV",
    "r2": "a0^2",          # electronic spatial extent (Bohr^2)
    "zpve": "eV",          # zero-point vibrational energy
    "U0": "eV",            # internal energy at 0 K (total energy; = Conformation.energy)
    "U": "eV",             # internal energy at 298.15 K
    "H": "eV",             # enthalpy at 298.15 K
    "G": "eV",             # free energy at 298.15 K
    "Cv": "cal/(mol K)",   # heat capacity at 298.15 K
    "U0_atom": "eV",       # atomization energies (SDF + CSV layout only)
    "U_atom": "eV",
    "H_atom": "eV",
    "G_atom": "eV",
    "mulliken_charges": "e",        # per atom (original xyz layout only)
    "frequencies": "cm^-1",         # harmonic frequencies (original xyz layout only)
}

#: The 15 properties of the original ``gdb`` comment line, in order.
XYZ_PROPERTIES = ("A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")

# Properties in Hartree in the original data (converted to eV).
_HARTREE = {"homo", "lumo", "gap", "zpve", "U0", "U", "H", "G"}

# Other spellings -> canonical name.
_ALIASES = {
    "epshomo": "homo", "epslumo": "lumo", "epsgap": "gap", "<r2>": "r2", "r2": "r2",
    "u0": "U0", "u": "U", "h": "H", "g": "G", "u298": "U", "h298": "H", "g298": "G",
    "cv": "Cv", "mu": "mu", "alpha": "alpha", "homo": "homo", "lumo": "lumo", "gap": "gap",
    "zpve": "zpve", "a": "A", "b": "B", "c": "C",
    "u0_atom": "U0_atom", "u298_atom": "U_atom", "h298_atom": "H_atom", "g298_atom": "G_atom",
}

# schnetpack 0.3 QM9 database keys -> canonical name (energies already in eV there).
_SCHNETPACK = {
    "rotational_constant_A": "A", "rotational_constant_B": "B", "rotational_constant_C": "C",
    "dipole_moment": "mu", "isotropic_polarizability": "alpha", "homo": "homo", "lumo": "lumo",
    "gap": "gap", "electronic_spatial_extent": "r2", "zpve": "zpve", "energy_U0": "U0",
    "energy_U": "U", "enthalpy_H": "H", "free_energy": "G", "heat_capacity": "Cv",
}


def _float(token: str) -> float:
    return float(token.replace("*^", "e"))


def _convert(props: dict[str, float], *, hartree_props: bool = True) -> dict[str, float]:
    """Original-unit properties -> documented units (Hartree -> eV, atomization kcal/mol -> eV)."""
    import ase.units as u

    out = {}
    for k, v in props.items():
        if k in _HARTREE and hartree_props:
            v = v * u.Hartree
        elif k.endswith("_atom"):
            v = v * u.kcal / u.mol
        out[k] = float(v)
    return out


def _record(z, pos, props, *, mol_id, source, lot, extra=None) -> Conformation:
    info = dict(props)
    if extra:
        info.update(extra)
    return Conformation(
        z=z, pos=pos, energy=props.get("U0"), forces=None, charge=0, equilibrium=True,
        source=source, level_of_theory=lot, mol_id=mol_id, info=info,
    )


# ---------------------------------------------------------------------------------------------
# original per-molecule xyz files


def is_qm9_xyz_header(lines: list[str]) -> bool:
    """True when the first lines look like an original QM9 xyz file (``gdb IDX ...`` on line 2)."""
    if len(lines) < 2:
        return False
    parts = lines[1].split()
    return len(parts) >= 2 and parts[0] == "gdb" and parts[1].isdigit()


def parse_qm9_xyz(text: str, *, file: str, record: int, source: str = "QM9", lot: str = LEVEL_OF_THEORY,
                  member: str | None = None) -> Conformation:
    """One original QM9 ``.xyz`` file (its whole text) -> a :class:`Conformation`."""
    from ase.data import atomic_numbers

    where = f"{member}: " if member else ""

    def fail(problem: str):
        raise DataError(where + problem, file=file, record=record)

    lines = text.splitlines()
    try:
        n = int(lines[0].strip())
    except (IndexError, ValueError):
        fail("line 1 should be the atom count (QM9 xyz layout)")
    if len(lines) < n + 2:
        fail(f"has {len(lines)} lines, fewer than the {n + 2} needed for {n} atoms")
    head = lines[1].split()
    if len(head) < 2 + len(XYZ_PROPERTIES) or head[0] != "gdb":
        fail(f"line 2 should be 'gdb IDX' and {len(XYZ_PROPERTIES)} properties, found {lines[1].strip()[:60]!r}")
    try:
        idx = int(head[1])
        values = [_float(t) for t in head[2 : 2 + len(XYZ_PROPERTIES)]]
    except ValueError:
        fail(f"line 2 has a non-numeric property: {lines[1].strip()[:80]!r}")
    z = np.empty(n, dtype=np.int64)
    pos = np.empty((n, 3))
    mulliken = np.full(n, np.nan)
    for a in range(n):
        parts = lines[2 + a].split()
        if len(parts) < 4 or parts[0] not in atomic_numbers:
            fail(f"atom line {a + 1} is not 'symbol x y z charge': {lines[2 + a].strip()[:60]!r}")
        z[a] = atomic_numbers[parts[0]]
        try:
            pos[a] = [_float(t) for t in parts[1:4]]
            if len(parts) > 4:
                mulliken[a] = _float(parts[4])
        except ValueError:
            fail(f"atom line {a + 1} has a non-numeric value: {lines[2 + a].strip()[:60]!r}")
    extra: dict = {"index": idx, "mulliken_charges": mulliken}
    rest = lines[2 + n :]
    if rest:
        try:
            extra["frequencies"] = np.array([_float(t) for t in rest[0].split()])
        except ValueError:
            pass
    if len(rest) > 1:
        smiles = rest[1].split()
        if smiles:
            extra["smiles"] = smiles[-1]  # relaxed-geometry SMILES
            extra["smiles_gdb"] = smiles[0]
    if len(rest) > 2:
        inchi = rest[2].split()
        if inchi:
            extra["inchi"] = inchi[-1]
    props = _convert(dict(zip(XYZ_PROPERTIES, values)))
    return _record(z, pos, props, mol_id=f"gdb_{idx}", source=source, lot=lot, extra=extra)


def _iter_xyz_texts(path: Path) -> Iterator[tuple[str, str]]:
    """``(member name, text)`` of every QM9 xyz file in a file, directory or tar archive."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".xyz")
        if not files:
            raise DataError("directory holds no .xyz files (QM9 layout)", file=str(path))
        for p in files:
            yield p.name, p.read_text(encoding="utf-8", errors="replace")
    elif tarfile.is_tarfile(path):
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xyz"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                yield member.name, handle.read().decode("utf-8", errors="replace")
    else:
        yield "", path.read_text(encoding="utf-8", errors="replace")


def _read_xyz_files(path: Path, source: str, lot: str) -> Iterator[Conformation]:
    file = str(path)
    for i, (member, text) in enumerate(_iter_xyz_texts(path)):
        conf = parse_qm9_xyz(text, file=file, record=i, source=source, lot=lot, member=member or None)
        if member:
            conf.info["member"] = member
        yield conf


# ---------------------------------------------------------------------------------------------
# SDF + CSV


def _csv_for(path: Path) -> Path | None:
    for cand in (Path(str(path) + ".csv"), path.with_suffix(".csv"), path.parent / "gdb9.sdf.csv"):
        if cand.exists():
            return cand
    return None


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, float]]]:
    import csv

    ids, rows = [], []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError("CSV has no header line", file=str(csv_path))
        id_col = next((c for c in reader.fieldnames if c.strip().lower() in ("mol_id", "gdb_idx", "index", "id")), None)
        for line_no, row in enumerate(reader):
            props = {}
            for key, value in row.items():
                if key is None or key == id_col:
                    continue
                canon = _ALIASES.get(key.strip().lower())
                if canon is None or value in (None, ""):
                    continue
                try:
                    props[canon] = _float(value)
                except ValueError:
                    raise DataError(f"column {key!r} is not a number: {value!r}", file=str(csv_path),
                                    record=line_no) from None
            ids.append(row[id_col].strip() if id_col else "")
            rows.append(props)
    return ids, rows


def _read_sdf(path: Path, source: str, lot: str, csv: str | Path | None, errors: str) -> Iterator[Conformation]:
    from .pcqm4mv2 import iter_sdf, mol_arrays

    file = str(path)
    csv_path = Path(csv) if csv is not None else _csv_for(path)
    by_id: dict[str, dict] = {}
    rows: list[dict] = []
    if csv_path is not None:
        ids, rows = _read_csv(csv_path)
        by_id = {i: r for i, r in zip(ids, rows) if i}
    for i, mol in iter_sdf(path, errors=errors):
        z, pos, charge = mol_arrays(mol, file=file, record=i)
        title = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
        if csv_path is not None:
            if title in by_id:
                raw = by_id[title]
            elif not by_id and i < len(rows):
                raw = rows[i]
            else:
                raise DataError(f"molecule {title or i!r} has no row in {str(csv_path)!r}", file=file, record=i)
        else:
            raw = {}
            for key, value in mol.GetPropsAsDict().items():
                canon = _ALIASES.get(str(key).strip().lower())
                if canon is not None:
                    try:
                        raw[canon] = float(value)
                    except (TypeError, ValueError):
                        pass
        props = _convert(raw)
        mol_id = title or f"gdb_{i + 1}"
        conf = _record(z, pos, props, mol_id=mol_id, source=source, lot=lot, extra={"sdf_index": i})
        conf.charge = charge
        yield conf


# ---------------------------------------------------------------------------------------------
# extended XYZ (properties in info) and schnetpack database


def _from_info(info: dict) -> dict[str, float]:
    props = {}
    for key, value in info.items():
        canon = _ALIASES.get(str(key).strip().lower())
        if canon is None or canon in props and str(key) != canon:
            continue
        try:
            props[canon] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            continue
    return props


def _read_extxyz(path: Path, source: str, lot: str) -> Iterator[Conformation]:
    import ase.io

    file = str(path)
    try:
        frames = ase.io.iread(file, index=":", format="extxyz")
        for i, atoms in enumerate(frames):
            props = _convert(_from_info(atoms.info))
            if "U0" not in props:
                raise DataError("frame has no U0 (QM9 extxyz layout: properties in the comment line)",
                                file=file, record=i)
            mol_id = str(atoms.info.get("mol_id", "") or "")
            if not mol_id:
                idx = atoms.info.get("index", atoms.info.get("gdb_idx"))
                mol_id = f"gdb_{int(idx)}" if idx is not None else f"{path.stem}:{i}"
            yield _record(atoms.numbers.copy(), atoms.positions.copy(), props, mol_id=mol_id,
                          source=source, lot=lot, extra={"frame": i})
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot be read as extended XYZ: {type(exc).__name__}: {exc}", file=file) from exc


def _read_db(path: Path, source: str, lot: str) -> Iterator[Conformation]:
    import ase.db
    import ase.units as u

    file = str(path)
    try:
        db = ase.db.connect(file, type="db")
        for i, row in enumerate(db.select()):
            raw = {}
            for key, canon in _SCHNETPACK.items():
                value = row.data.get(key, row.get(key))
                if value is not None:
                    raw[canon] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
            if "U0" not in raw:
                raise DataError("row has no energy_U0 (schnetpack QM9 database layout)", file=file, record=i)
            # schnetpack 0.3 stored ASE units: energies eV, mu e*Angstrom, alpha Angstrom^3,
            # r2 Angstrom^2 (checked against the original values of the same molecules)
            props = _convert(raw, hartree_props=False)
            if "mu" in props:
                props["mu"] /= u.Debye
            if "alpha" in props:
                props["alpha"] /= u.Bohr**3
            if "r2" in props:
                props["r2"] /= u.Bohr**2
            yield _record(row.numbers, np.asarray(row.positions), props, mol_id=f"{path.stem}:{row.id}",
                          source=source, lot=lot, extra={"row_id": int(row.id)})
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot be read as an ASE database: {type(exc).__name__}: {exc}", file=file) from exc


def _head_lines(path: Path, n: int = 3) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [fh.readline() for _ in range(n)]
    except OSError:
        return []


def read_qm9(
    path: str | Path,
    *,
    csv: str | Path | None = None,
    errors: str = "raise",
    source: str | None = None,
    level_of_theory: str | None = None,
) -> Iterator[Conformation]:
    """Yield the molecules of QM9 in any of the layouts of the module docstring.

    Args:
        path: a ``dsgdb9nsd_*.xyz`` file, a directory of them, their tar archive, ``gdb9.sdf``,
            an extended-XYZ file with the properties in the comment line, or a schnetpack ``.db``.
        csv: the properties CSV of an SDF (default ``<sdf>.csv`` next to it).
        errors: for SDF, ``"raise"`` on a molblock RDKit cannot parse or ``"skip"`` it.
        source, level_of_theory: defaults ``QM9`` and B3LYP/6-31G(2df,p).
    """
    path = Path(path)
    src = source or "QM9"
    lot = level_of_theory or LEVEL_OF_THEORY
    if not path.exists():
        raise DataError("file does not exist", file=str(path))
    suffix = path.suffix.lower()
    if path.is_dir() or (suffix not in (".sdf", ".db", ".xyz", ".extxyz") and tarfile.is_tarfile(path)):
        yield from _read_xyz_files(path, src, lot)
    elif suffix == ".sdf":
        yield from _read_sdf(path, src, lot, csv, errors)
    elif suffix == ".db":
        yield from _read_db(path, src, lot)
    elif is_qm9_xyz_header(_head_lines(path)):
        yield from _read_xyz_files(path, src, lot)
    else:
        yield from _read_extxyz(path, src, lot)
