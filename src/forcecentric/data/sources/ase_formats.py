"""Reader for every format ASE can read (extxyz, xyz, traj, db, ...).

Energies and forces are taken from the structure's calculator (how ASE stores ``energy=`` and
``forces`` in extxyz) or from ``atoms.info`` / ``atoms.arrays`` under configurable keys, e.g.
``REF_energy`` / ``REF_forces``. Values are assumed to be in eV and eV/Angstrom unless
``energy_unit`` / ``length_unit`` say otherwise (names from :mod:`ase.units`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..conformation import Conformation, scalar_info

_TRUE = {"true", "t", "1", "yes"}


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return bool(value)


def _unit(name: str, path: str) -> float:
    """Value in eV / Angstrom of a unit expression such as ``Hartree``, ``kcal/mol`` or ``Bohr``."""
    import re

    import ase.units

    value = 1.0
    for op, token in re.findall(r"([*/]?)\s*([A-Za-z_][A-Za-z_0-9]*)", name):
        if token in ("eV", "Ang", "Angstrom", "A"):
            factor = 1.0
        else:
            factor = getattr(ase.units, token, None)
            if not isinstance(factor, (int, float)):
                raise DataError(f"unknown unit {token!r} in {name!r} (expected names from ase.units)", file=path)
        value = value / factor if op == "/" else value * factor
    return float(value)


def conformation_from_atoms(
    atoms,
    *,
    file: str,
    index: int,
    energy_key: str | None = None,
    forces_key: str | None = None,
    equilibrium: bool | None = None,
    source: str | None = None,
    level_of_theory: str | None = None,
    energy_scale: float = 1.0,
    length_scale: float = 1.0,
) -> Conformation:
    """Turn one ``ase.Atoms`` into a :class:`Conformation` (not yet validated)."""
    info = dict(atoms.info)
    energy = forces = None
    calc = atoms.calc
    if energy_key is not None:
        if energy_key in info:
            energy = info[energy_key]
        elif calc is not None and energy_key in getattr(calc, "results", {}):
            energy = calc.results[energy_key]
    elif calc is not None and "energy" in calc.results:
        energy = calc.results["energy"]
    elif "energy" in info:
        energy = info["energy"]
    if forces_key is not None:
        if forces_key in atoms.arrays:
            forces = atoms.arrays[forces_key]
        elif calc is not None and forces_key in getattr(calc, "results", {}):
            forces = calc.results[forces_key]
    elif calc is not None and "forces" in calc.results:
        forces = calc.results["forces"]
    elif "forces" in atoms.arrays:
        forces = atoms.arrays["forces"]
    if energy is not None:
        try:
            energy = float(energy) * energy_scale
        except (TypeError, ValueError):
            raise DataError(f"energy {energy!r} is not a number", file=file, record=index) from None
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64) * (energy_scale / length_scale)
    eq = equilibrium if equilibrium is not None else _as_bool(info.pop("equilibrium", False))
    charge = info.pop("charge", None)
    if charge is None:
        charge = int(round(float(np.sum(atoms.get_initial_charges()))))
    mol_id = str(info.pop("mol_id", "") or atoms.get_chemical_formula())
    return Conformation(
        z=atoms.numbers.copy(),
        pos=atoms.positions * length_scale,
        energy=energy,
        forces=forces,
        charge=int(charge),
        equilibrium=bool(eq),
        source=str(source or info.pop("source", "") or Path(file).stem),
        level_of_theory=str(level_of_theory or info.pop("level_of_theory", "")),
        mol_id=mol_id,
        info=scalar_info(info),
    )


def read_ase(
    path: str | Path,
    *,
    index: str = ":",
    format: str | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    equilibrium: bool | None = None,
    source: str | None = None,
    level_of_theory: str | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Ang",
) -> Iterator[Conformation]:
    """Yield the conformations of any ASE-readable file.

    Args:
        path: the file.
        index: ASE index string (``":"`` for all frames).
        format: ASE format name; guessed from the file when None.
        energy_key, forces_key: where the labels are when they are not ASE's defaults.
        equilibrium: force the equilibrium flag (default: ``atoms.info["equilibrium"]`` or False).
        energy_unit, length_unit: names from :mod:`ase.units` the file's values are in.
    """
    import ase.io

    path = str(path)
    e_scale = _unit(energy_unit, path)
    l_scale = _unit(length_unit, path)
    try:
        frames = ase.io.iread(path, index=index, format=format)
        for i, atoms in enumerate(frames):
            yield conformation_from_atoms(
                atoms,
                file=path,
                index=i,
                energy_key=energy_key,
                forces_key=forces_key,
                equilibrium=equilibrium,
                source=source,
                level_of_theory=level_of_theory,
                energy_scale=e_scale,
                length_scale=l_scale,
            )
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("file does not exist", file=path) from None
    except Exception as exc:  # ASE raises many different exception types on malformed files
        raise DataError(f"cannot be read by ASE: {type(exc).__name__}: {exc}", file=path) from exc
