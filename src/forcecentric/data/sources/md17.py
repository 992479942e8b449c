"""Readers for the MD17 family: original MD17, revised MD17 (rMD17) and MD22.

Layouts (all off-equilibrium molecular-dynamics frames, ``equilibrium=False``):

* original MD17 / MD22 / sGDML ``.npz`` (quantum-machine.org): ``z`` [n_atoms], ``R``
  [n_frames, n_atoms, 3] in Angstrom, ``E`` [n_frames, 1] in kcal/mol, ``F`` [n_frames, n_atoms, 3]
  in kcal/mol/Angstrom, plus ``name``, ``theory`` and (newer sGDML files) ``e_unit`` / ``r_unit``,
  which are honoured when present;
* revised MD17 ``.npz`` (Christensen & von Lilienfeld 2020, figshare): ``nuclear_charges``,
  ``coords`` (Angstrom), ``energies`` (kcal/mol), ``forces`` (kcal/mol/Angstrom), plus
  ``old_indices`` / ``old_energies`` / ``old_forces`` (the original MD17 frame they recompute);
* original MD17 plain ``.xyz`` (e.g. ``ethanol.xyz`` of the first release, schnetpack's
  ``ethanol_snip.xyz``): line 2 is the energy in kcal/mol, atom lines are
  ``symbol x y z fx fy fz`` with forces in kcal/mol/Angstrom;
* schnetpack's ASE database of MD17 (``row.data["energy"]`` [1] and ``row.data["forces"]``
  [n_atoms, 3], kcal/mol as in the source).

Every value is converted to eV, eV/Angstrom and Angstrom with :mod:`ase.units`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..conformation import Conformation
from .ase_formats import _unit

#: Key sets that identify each npz layout.
MD17_KEYS = ("z", "R", "E", "F")
RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")

#: Default level of theory of each dataset (used when the file does not say).
LEVEL_OF_THEORY = {
    "MD17": "PBE+vdW-TS",
    "rMD17": "PBE/def2-SVP",
    "MD22": "PBE+MBD",
}

#: Molecule names of MD22 (file names ``md22_<name>.npz``).
MD22_MOLECULES = {
    "Ac-Ala3-NHMe", "DHA", "stachyose", "AT-AT", "AT-AT-CG-CG",
    "buckyball-catcher", "buckyball_catcher", "double-walled_nanotube", "double_walled_nanotube",
}

# Unit names used in sGDML files -> ase.units expressions.
_SGDML_UNITS = {
    "ang": "Ang", "angstrom": "Ang", "a": "Ang", "bohr": "Bohr", "au": "Bohr", "nm": "nm",
    "kcal/mol": "kcal/mol", "ev": "eV", "hartree": "Hartree", "ha": "Hartree",
    "kj/mol": "kJ/mol",
}


def npz_layout(keys) -> str | None:
    """``"md17"`` (also MD22 / sGDML), ``"rmd17"`` or None from the keys of an npz file."""
    keys = set(keys)
    if all(k in keys for k in RMD17_KEYS):
        return "rmd17"
    if all(k in keys for k in MD17_KEYS):
        return "md17"
    return None


def _scalar_str(value) -> str:
    value = np.asarray(value)
    if value.shape == ():
        value = value.item()
    elif value.size == 1:
        value = value.reshape(-1)[0]
    else:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)


def _meta(data, key: str) -> str:
    """A string entry of an npz archive, or "" when absent or unreadable without pickle."""
    if key not in data:
        return ""
    try:
        return _scalar_str(data[key])
    except ValueError:
        return ""


def _sgdml_unit(name: str, default: str, path: str) -> float:
    if not name:
        return _unit(default, path)
    key = name.strip().lower()
    if key not in _SGDML_UNITS:
        raise DataError(f"unknown unit {name!r} in the file (known: {sorted(_SGDML_UNITS)})", file=path)
    return _unit(_SGDML_UNITS[key], path)


def _dataset_from_name(path: Path, name: str) -> str:
    stem = path.stem.lower()
    if stem.startswith("md22") or name in MD22_MOLECULES:
        return "MD22"
    if stem.startswith("rmd17"):
        return "rMD17"
    return "MD17"


def _molecule_name(path: Path, name: str) -> str:
    if name:
        return name
    stem = path.stem
    for prefix in ("rmd17_", "md17_", "md22_"):
        if stem.lower().startswith(prefix):
            return stem[len(prefix):]
    return stem


def read_md17(
    path: str | Path,
    *,
    source: str | None = None,
    level_of_theory: str | None = None,
    mol_id: str | None = None,
    energy_unit: str | None = None,
    length_unit: str | None = None,
) -> Iterator[Conformation]:
    """Yield the frames of an MD17, rMD17 or MD22 file (layout detected from keys / contents).

    Args:
        path: ``.npz`` (original MD17, MD22 or rMD17 layout), MD17 plain ``.xyz`` or schnetpack
            ``.db``.
        source: dataset name (default ``MD17``, ``rMD17`` or ``MD22`` from the layout and name).
        level_of_theory: default from the file's ``theory`` entry or the dataset's published level.
        mol_id: molecule identity (default the file's ``name`` entry or the file name).
        energy_unit, length_unit: override the file's units (names from :mod:`ase.units`, e.g.
            ``"kcal/mol"``, ``"eV"``); by default kcal/mol and Angstrom, or the file's
            ``e_unit`` / ``r_unit``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        yield from _read_npz(path, source, level_of_theory, mol_id, energy_unit, length_unit)
    elif suffix == ".db":
        yield from _read_db(path, source, level_of_theory, mol_id, energy_unit, length_unit)
    else:
        yield from _read_xyz(path, source, level_of_theory, mol_id, energy_unit, length_unit)


def _read_npz(path, source, level_of_theory, mol_id, energy_unit, length_unit):
    file = str(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot be read as an npz archive: {exc}", file=file) from exc
    with data:
        keys = list(data.keys())
        layout = npz_layout(keys)
        if layout is None:
            have = set(keys)
            missing_md17 = [k for k in MD17_KEYS if k not in have]
            missing_rmd17 = [k for k in RMD17_KEYS if k not in have]
            missing = missing_md17 if len(missing_md17) <= len(missing_rmd17) else missing_rmd17
            raise DataError(
                f"not an MD17/MD22 (keys {list(MD17_KEYS)}) or rMD17 (keys {list(RMD17_KEYS)}) archive: "
                f"missing {missing}; keys present: {sorted(keys)}",
                file=file,
            )
        try:
            if layout == "md17":
                z, R, E, F = (data[k] for k in MD17_KEYS)
                name, theory, e_unit, r_unit = (_meta(data, k) for k in ("name", "theory", "e_unit", "r_unit"))
                dataset = _dataset_from_name(path, name)
            else:
                z, R, E, F = (data[k] for k in RMD17_KEYS)
                name, theory, e_unit, r_unit = "", "", "", ""
                dataset = "rMD17"
                old_idx = data["old_indices"] if "old_indices" in keys else None
        except ValueError as exc:  # e.g. an object array, which needs pickle
            raise DataError(f"cannot read the arrays: {exc}", file=file) from exc

    e_scale = _unit(energy_unit, file) if energy_unit else _sgdml_unit(e_unit, "kcal/mol", file)
    l_scale = _unit(length_unit, file) if length_unit else _sgdml_unit(r_unit, "Ang", file)
    z = np.asarray(z).reshape(-1)
    R = np.asarray(R, dtype=np.float64)
    E = np.asarray(E, dtype=np.float64)
    F = np.asarray(F, dtype=np.float64)
    n = R.shape[0] if R.ndim == 3 else -1
    if R.ndim != 3 or R.shape[1:] != (z.shape[0], 3):
        raise DataError(f"positions have shape {R.shape}, expected (n_frames, {z.shape[0]}, 3)", file=file)
    if E.reshape(-1).shape[0] != n or (E.ndim == 2 and E.shape[1] != 1) or E.ndim > 2:
        raise DataError(f"energies have shape {E.shape} for {n} frames (expected ({n},) or ({n}, 1))", file=file)
    if F.shape != R.shape:
        raise DataError(f"forces have shape {F.shape} but positions have shape {R.shape}", file=file)
    E = E.reshape(-1)
    src = source or dataset
    lot = level_of_theory or theory or LEVEL_OF_THEORY.get(dataset, "")
    mid = mol_id or _molecule_name(path, name)
    f_scale = e_scale / l_scale
    for i in range(n):
        info = {"frame": i}
        if layout == "rmd17" and old_idx is not None and old_idx.shape[0] == n:
            info["md17_index"] = int(old_idx[i])
        yield Conformation(
            z=z, pos=R[i] * l_scale, energy=E[i] * e_scale, forces=F[i] * f_scale,
            equilibrium=False, source=src, level_of_theory=lot, mol_id=mid, info=info,
        )


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eEdD][-+]?\d+)?$")


def is_md17_xyz_header(lines: list[str]) -> bool:
    """True for the MD17 plain-XYZ layout: energy alone on line 2, 7 columns per atom line."""
    if len(lines) < 3:
        return False
    try:
        int(lines[0].strip())
    except ValueError:
        return False
    if not _FLOAT.match(lines[1].strip()):
        return False
    return len(lines[2].split()) == 7


def _read_xyz(path, source, level_of_theory, mol_id, energy_unit, length_unit):
    from ase.data import atomic_numbers

    file = str(path)
    e_scale = _unit(energy_unit or "kcal/mol", file)
    l_scale = _unit(length_unit or "Ang", file)
    dataset = _dataset_from_name(path, "")
    src = source or dataset
    lot = level_of_theory or LEVEL_OF_THEORY[dataset]
    mid = mol_id or _molecule_name(path, "")
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot be opened: {exc}", file=file) from exc
    with fh:
        record = 0
        while True:
            line = fh.readline()
            if not line:
                return
            if not line.strip():
                continue
            try:
                n = int(line.strip())
            except ValueError:
                raise DataError(f"expected an atom count, found {line.strip()[:40]!r}", file=file, record=record) from None
            comment = fh.readline()
            try:
                energy = float(comment.strip().replace("D", "e").replace("d", "e"))
            except ValueError:
                raise DataError(
                    f"line 2 of the frame should be the energy (MD17 xyz layout), found {comment.strip()[:40]!r}",
                    file=file, record=record,
                ) from None
            z = np.empty(n, dtype=np.int64)
            pos = np.empty((n, 3))
            forces = np.empty((n, 3))
            for a in range(n):
                parts = fh.readline().split()
                if len(parts) != 7:
                    raise DataError(
                        f"atom line {a + 1} has {len(parts)} columns, expected 7 (symbol x y z fx fy fz)",
                        file=file, record=record,
                    )
                if parts[0] not in atomic_numbers:
                    raise DataError(f"unknown element {parts[0]!r}", file=file, record=record)
                z[a] = atomic_numbers[parts[0]]
                try:
                    vals = [float(v) for v in parts[1:]]
                except ValueError:
                    raise DataError(f"atom line {a + 1} has a non-numeric value", file=file, record=record) from None
                pos[a] = vals[:3]
                forces[a] = vals[3:]
            yield Conformation(
                z=z, pos=pos * l_scale, energy=energy * e_scale, forces=forces * (e_scale / l_scale),
                equilibrium=False, source=src, level_of_theory=lot, mol_id=mid, info={"frame": record},
            )
            record += 1


def _read_db(path, source, level_of_theory, mol_id, energy_unit, length_unit):
    import ase.db

    file = str(path)
    try:
        db = ase.db.connect(file, type="db")
        meta = db.metadata or {}
    except Exception as exc:
        raise DataError(f"cannot be read as an ASE database: {type(exc).__name__}: {exc}", file=file) from exc
    # schnetpack >= 1.0 records its units in the metadata; 0.3 databases (MD17) are in kcal/mol
    units = meta.get("_property_unit_dict", {}) if isinstance(meta, dict) else {}
    e_scale = _unit(energy_unit or units.get("energy") or "kcal/mol", file)
    l_scale = _unit(length_unit or meta.get("_distance_unit") or "Ang", file)
    f_scale = (e_scale / l_scale) if (energy_unit or "forces" not in units) else _unit(units["forces"], file)
    dataset = _dataset_from_name(path, "")
    src = source or dataset
    lot = level_of_theory or LEVEL_OF_THEORY[dataset]
    try:
        rows = db.select()
        for i, row in enumerate(rows):
            data = row.data
            if "energy" not in data and row.get("energy") is None:
                raise DataError("row has no 'energy' in its data (schnetpack MD17 layout)", file=file, record=i)
            energy = data["energy"] if "energy" in data else row.energy
            forces = data["forces"] if "forces" in data else (row.get("forces"))
            energy = float(np.asarray(energy, dtype=np.float64).reshape(-1)[0]) * e_scale
            if forces is not None:
                forces = np.asarray(forces, dtype=np.float64) * f_scale
            yield Conformation(
                z=row.numbers, pos=np.asarray(row.positions) * l_scale, energy=energy, forces=forces,
                equilibrium=False, source=src, level_of_theory=lot,
                mol_id=mol_id or row.formula, info={"frame": i},
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot be read as an ASE database: {type(exc).__name__}: {exc}", file=file) from exc
