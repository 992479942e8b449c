"""The Conformation record: one 3D structure with optional labels, in eV, Angstrom and e.

Every reader produces these records; nothing downstream converts units again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError

#: Two atoms closer than this (Angstrom) make a record invalid.
MIN_DISTANCE = 0.1


def scalar_info(info: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of an ``info`` dict (numbers, strings, booleans) as plain Python values.

    ASE's extxyz parser gives integers as NumPy scalars, which are not ``int`` instances: they are
    kept too, as Python numbers, so that integer metadata survives a write and a read.
    """
    out = {}
    for k, v in info.items():
        if isinstance(v, np.generic) and v.ndim == 0 and isinstance(v.item(), (int, float, str, bool)):
            v = v.item()
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
    return out


def matches(record: "Conformation", select: dict[str, Any]) -> bool:
    """Whether ``record`` has every ``key: value`` of ``select`` (compared as strings; a true/false
    value in any case), where a key is ``mol_id``, ``source``, ``level_of_theory``,
    ``equilibrium`` or ``charge``, or else an ``info`` key."""
    own = ("mol_id", "source", "level_of_theory", "equilibrium", "charge")

    def same(have: Any, want: Any) -> bool:
        if isinstance(have, (bool, np.bool_)):
            return str(bool(have)).lower() == str(want).strip().lower()
        return str(have) == str(want)

    return all(same(getattr(record, k) if k in own else record.info.get(k), v) for k, v in select.items())


@dataclass
class Conformation:
    """One conformation.

    Attributes:
        z: atomic numbers, int64 ``[n]``.
        pos: positions in Angstrom, float64 ``[n, 3]``.
        energy: total energy in eV, or None.
        forces: forces in eV/Angstrom ``[n, 3]``, or None.
        charge: total charge in e.
        equilibrium: True for optimized minima whose forces are not used as labels.
        source: dataset name.
        level_of_theory: e.g. ``"GFN2-xTB"`` or ``"PBE/def2-SVP"``.
        mol_id: molecule identity (used for splits by molecule).
        info: any further per-record metadata.
    """

    z: np.ndarray
    pos: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    charge: int = 0
    equilibrium: bool = False
    source: str = ""
    level_of_theory: str = ""
    mol_id: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.z = np.asarray(self.z, dtype=np.int64).reshape(-1)
        self.pos = np.asarray(self.pos, dtype=np.float64)
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64)
        if self.energy is not None:
            self.energy = float(self.energy)

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])

    def to_atoms(self):
        """An :class:`ase.Atoms` with the labels on a single-point calculator and the flags in
        ``info``: the extxyz reader gives back the same record."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.z, positions=self.pos)
        scalars = scalar_info(self.info)
        atoms.info.update(scalars)
        atoms.info.update(equilibrium=bool(self.equilibrium), charge=int(self.charge), mol_id=self.mol_id)
        if self.source:
            atoms.info["source"] = self.source
        if self.level_of_theory:
            atoms.info["level_of_theory"] = self.level_of_theory
        if self.energy is not None or self.forces is not None:
            atoms.calc = SinglePointCalculator(atoms, energy=self.energy, forces=self.forces)
        return atoms

    def validate(
        self,
        *,
        file: str | None = None,
        record: int | None = None,
        min_distance: float = MIN_DISTANCE,
        max_force: float | None = None,
    ) -> "Conformation":
        """Check shapes, finiteness and geometry; raise :class:`DataError` naming file and record."""

        def fail(problem: str) -> None:
            raise DataError(problem, file=file, record=record)

        n = self.z.shape[0]
        if n == 0:
            fail("conformation has no atoms")
        if self.pos.shape != (n, 3):
            fail(f"positions have shape {self.pos.shape}, expected ({n}, 3) for {n} atoms")
        if np.any(self.z < 1) or np.any(self.z > 118):
            fail(f"invalid atomic numbers {sorted(set(self.z.tolist()))}")
        if not np.all(np.isfinite(self.pos)):
            fail("positions contain NaN or Inf")
        if self.energy is not None and not np.isfinite(self.energy):
            fail(f"energy is {self.energy}")
        if self.forces is not None:
            if self.forces.shape != (n, 3):
                fail(
                    f"forces have shape {self.forces.shape} but positions have shape {self.pos.shape}"
                )
            if not np.all(np.isfinite(self.forces)):
                fail("forces contain NaN or Inf")
            if max_force is not None:
                fmax = float(np.abs(self.forces).max())
                if fmax > max_force:
                    fail(f"force component {fmax:.3g} eV/A exceeds the bound {max_force} eV/A")
        if n > 1:
            dmin, (i, j) = closest_pair(self.pos)
            if dmin < min_distance:
                fail(
                    f"atoms {i} and {j} are {dmin:.4f} A apart (closer than {min_distance} A)"
                )
        return self


def closest_pair(pos: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Smallest interatomic distance and the pair that has it (inf for fewer than 2 atoms)."""
    if len(pos) < 2:
        return float("inf"), (0, 0)
    n = pos.shape[0]
    if n <= 2000:
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
        d[np.diag_indices(n)] = np.inf
        k = int(np.argmin(d))
        i, j = divmod(k, n)
        return float(d[i, j]), (i, j)
    from scipy.spatial import cKDTree  # large systems only

    tree = cKDTree(pos)
    dist, idx = tree.query(pos, k=2)
    i = int(np.argmin(dist[:, 1]))
    return float(dist[i, 1]), (i, int(idx[i, 1]))
