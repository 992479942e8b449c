"""DFT energies and forces with PySCF: the few expensive labels of a cheap-sampling workflow.

GFN2-xTB (:mod:`.label`) samples a molecule's conformations by the thousand; a DFT single point
with gradients costs seconds to minutes per frame on a CPU (PBE/def2-SVP with density fitting:
about 8 s for ethanol on 2 cores). :func:`dft_labels` computes one frame's energy (eV) and forces
(eV/Å) with PySCF, so that a user can label the few frames a fine-tuning needs at the level of
theory of their reference data; ``forcecentric relabel --method dft`` (:mod:`.relabel`) does it
for a file of frames, resumably.

The defaults, PBE/def2-SVP with density fitting on PySCF's default grid, reproduce the rMD17
labels (ORCA, PBE/def2-SVP): about 1 meV/Å mean absolute force difference on rMD17 ethanol
frames, and total energies within about 5 meV (tested in ``tests/test_dft.py``).
``DFTSettings(xc="wb97x", basis="6-31g*")`` reproduces the 3BPA labels (ORCA, wB97X/6-31G(d)) to
about 4 meV/Å and 5 meV (a slow test).

PySCF is an optional dependency: ``pip install "forcecentric[dft]"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import units
from ase.calculators.calculator import Calculator, all_changes

from ..errors import DataError, MissingDependencyError

__all__ = ["DFTSettings", "PySCFCalculator", "dft_labels", "require_pyscf"]


def require_pyscf():
    """The ``pyscf`` module, or an error that says how to install it."""
    try:
        import pyscf  # noqa: F401
        from pyscf import dft, gto
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "DFT labels need PySCF: pip install 'forcecentric[dft]' (or pip install pyscf)"
        ) from exc
    return gto, dft


@dataclass(frozen=True)
class DFTSettings:
    """How :func:`dft_labels` computes a frame.

    Attributes:
        xc: exchange-correlation functional, a PySCF name (``"pbe"``, ``"b3lyp"``, ``"wb97x"``,
            ``"wb97m-d3bj"`` ...).
        basis: basis set, a PySCF name (``"def2-svp"``, ``"6-31g*"`` ...).
        density_fit: resolution of the identity for the Coulomb (and exchange) integrals, with
            PySCF's default auxiliary basis for ``basis``: several times faster, ~1 meV/Å.
        grid_level: PySCF's DFT integration grid level (0-9; PySCF's default is 3).
        conv_tol: SCF energy convergence (Hartree).
        max_cycle: SCF iterations before a frame counts as not converged.
        max_memory_mb: PySCF's memory limit per calculation.
    """

    xc: str = "pbe"
    basis: str = "def2-svp"
    density_fit: bool = True
    grid_level: int = 3
    conv_tol: float = 1e-9
    max_cycle: int = 100
    max_memory_mb: int = 4000

    @property
    def level_of_theory(self) -> str:
        """The record's ``level_of_theory``, e.g. ``"PBE/def2-SVP"``."""
        basis = self.basis
        if basis.lower().startswith("def2-"):
            basis = "def2-" + basis[5:].upper()
        return f"{self.xc.upper()}/{basis}"


def check_finite_labels(energy: float, forces: np.ndarray, problem: str, *,
                        file: str | None = None, record: int | None = None) -> None:
    """Raise :class:`DataError` (``problem``, naming ``file`` and ``record``) unless the energy and
    every force component are finite: a labeller's NaN never reaches a store."""
    if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
        raise DataError(problem, file=file, record=record)


def _multiplicity(z: np.ndarray, charge: int, multiplicity: int | None) -> int:
    n_electrons = int(np.sum(z)) - int(charge)
    if n_electrons < 0:
        raise ValueError(f"charge {charge} leaves {n_electrons} electrons")
    if multiplicity is None:
        return 1 + n_electrons % 2
    if multiplicity < 1 or (multiplicity - 1) % 2 != n_electrons % 2:
        raise ValueError(f"multiplicity {multiplicity} is impossible with {n_electrons} electrons")
    return int(multiplicity)


def dft_labels(
    z,
    pos,
    charge: int = 0,
    multiplicity: int | None = None,
    settings: DFTSettings = DFTSettings(),
    *,
    file: str | None = None,
    record: int | None = None,
) -> tuple[float, np.ndarray]:
    """DFT total energy (eV) and forces (eV/Å) of one structure, from a fresh PySCF calculation.

    Each call starts from PySCF's default initial guess, so a label depends on its geometry and
    ``settings`` alone, not on the frames computed before it. Closed shells use restricted
    Kohn-Sham; an odd electron count (or ``multiplicity`` > 1) unrestricted Kohn-Sham, with the
    lowest multiplicity the electron count allows unless ``multiplicity`` is given.

    Args:
        z: atomic numbers ``[n]``.
        pos: positions in Å ``[n, 3]``.
        charge: total charge (e).
        multiplicity: spin multiplicity 2S + 1, or None for the lowest.
        settings: functional, basis and numerical settings.
        file, record: where the structure came from, for the error messages.

    Raises:
        DataError: the SCF did not converge, or the energy or a force is not finite.
        ValueError: the charge or multiplicity is impossible for the atoms.
    """
    gto, dft = require_pyscf()
    z = np.asarray(z, dtype=np.int64).reshape(-1)
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
    if z.shape[0] != pos.shape[0]:
        raise ValueError(f"{z.shape[0]} atomic numbers but {pos.shape[0]} positions")
    mult = _multiplicity(z, charge, multiplicity)
    mol = gto.M(
        atom=[(int(zi), tuple(map(float, p))) for zi, p in zip(z, pos)],
        unit="Angstrom",
        basis=settings.basis,
        charge=int(charge),
        spin=mult - 1,
        verbose=0,
        max_memory=settings.max_memory_mb,
    )
    mf = dft.KS(mol)  # restricted for singlets, unrestricted otherwise
    mf.xc = settings.xc
    mf.grids.level = settings.grid_level
    mf.conv_tol = settings.conv_tol
    mf.max_cycle = settings.max_cycle
    if settings.density_fit:
        mf = mf.density_fit()
    energy_ha = float(mf.kernel())
    if not mf.converged:
        raise DataError(
            f"{settings.level_of_theory} SCF did not converge in {settings.max_cycle} cycles "
            f"(conv_tol {settings.conv_tol:g} Ha)", file=file, record=record,
        )
    gradient = np.asarray(mf.nuc_grad_method().kernel(), dtype=np.float64)  # Hartree / Bohr
    energy = energy_ha * units.Hartree
    forces = -gradient * (units.Hartree / units.Bohr)
    check_finite_labels(energy, forces, f"{settings.level_of_theory} gave a non-finite energy or force",
                        file=file, record=record)
    return energy, forces


class PySCFCalculator(Calculator):
    """An ASE calculator for :func:`dft_labels`: energy and forces from a fresh PySCF calculation.

    It lets ASE's optimizers, vibrational analysis and dynamics run at the level of theory of a
    user's reference data (:mod:`forcecentric.data.label` uses it for minima and Hessians at DFT
    level: ``optimize_minimum(atoms, dft=DFTSettings())``). Every call starts from PySCF's initial
    guess, so results depend on the geometry alone, not on the calculator's history.

    Args:
        settings: functional, basis and numerical settings.
        charge: total charge (e).
        multiplicity: spin multiplicity 2S + 1, or None for the lowest the electrons allow.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, settings: DFTSettings = DFTSettings(), charge: int = 0, multiplicity: int | None = None):
        super().__init__()
        self.settings = settings
        self.charge = int(charge)
        self.multiplicity = multiplicity

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, forces = dft_labels(self.atoms.numbers, self.atoms.positions, self.charge, self.multiplicity,
                                    self.settings)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
