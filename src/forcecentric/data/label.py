"""Label molecules with GFN2-xTB: RDKit conformers -> minima, thermal MD and normal-mode samples.

The labeller turns ``(name, SMILES)`` pairs into labelled conformations, each an
:class:`ase.Atoms` carrying its labels the standard ASE way — a
:class:`~ase.calculators.singlepoint.SinglePointCalculator` with the energy (eV) and forces (eV/Å)
— plus these ``atoms.info`` keys:

``equilibrium`` (bool)
    ``True`` for optimized minima (their near-zero forces are recorded but are not meant as
    force labels), ``False`` for thermal samples.
``source`` (str)
    Name of the data set, e.g. ``"forcecentric-xtb-demo"``.
``mol_id`` (str), ``smiles`` (str)
    Molecule name and the SMILES it was built from.
``level_of_theory`` (str)
    ``"GFN2-xTB"``, or the DFT level (e.g. ``"PBE/def2-SVP"``) when the functions below run at
    DFT level with PySCF (their ``dft`` argument).
``charge`` (int)
    Total charge (sum of the SMILES formal charges).
``sampling`` (str)
    ``"minimum"``, ``"md"`` or ``"normal_mode"``.
``temperature_K`` (float)
    Temperature of the thermal sample; ``0.0`` for minima.

Pipeline for one molecule (:func:`label_molecule`):

1. :func:`embed` — RDKit ETKDGv3 conformers (hydrogens added), optionally MMFF pre-optimized;
   with ``n_screen``, :func:`rank_conformers` keeps one conformer of each distinct MMFF minimum,
   so that the rotamers ETKDG rarely draws are optimized too.
2. :func:`optimize_minimum` — GFN2-xTB (tblite) BFGS minimization of each conformer, refusing
   runs that do not converge or in which the bond graph changes (fragmentation,
   rearrangement); duplicate minima (same sorted interatomic distances and energy) are dropped.
3. :func:`sample_md` — short Langevin MD from the minima at several temperatures, keeping
   decorrelated frames after an equilibration.
4. :func:`sample_normal_modes` — ANI-style normal-mode sampling at temperature (Smith, Isayev &
   Roitberg, Chem. Sci. 2017) from the GFN2-xTB Hessian of the minima.
5. :func:`filter_frames` — drops thermal frames with a force component above a bound, atoms
   closer than a bound, or a molecule that fell apart; every drop is reported.

:func:`label_molecules` runs many molecules in parallel worker processes (one OpenMP thread
each) and collects failures instead of stopping; :func:`write_extxyz` writes the records
atomically to an extended-XYZ file that ``ase.io.read(path, ":")`` reads back with energies,
forces and info keys intact.

Every step can also run at DFT level (``dft=DFTSettings(...)``, PySCF through
:class:`~forcecentric.data.dft.PySCFCalculator`): a minimum and Hessian at the level of theory
of a user's reference data, so that normal-mode samples sit around the reference's own minimum
rather than GFN2-xTB's. A DFT gradient costs seconds per frame where GFN2-xTB costs
milliseconds; DFT runs use all the threads OpenMP allows.

Units: Å, eV, eV/Å, K, fs (see ``DESIGN.md`` §5). Randomness: every function takes a seed, and
the per-molecule streams in :func:`label_molecules` depend only on ``(seed, name)``, so results
do not depend on the order in which workers finish.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator

from ..errors import DataError
from ..workers import process_pool
from .conformation import closest_pair
from .dft import DFTSettings, check_finite_labels

__all__ = [
    "DEFAULT_SOURCE",
    "LEVEL_OF_THEORY",
    "INFO_KEYS",
    "SAMPLING_KINDS",
    "embed",
    "rank_conformers",
    "xtb_calculator",
    "optimize_minimum",
    "sample_md",
    "normal_modes",
    "sample_normal_modes",
    "filter_frames",
    "label_molecule",
    "label_molecules",
    "relabel_xtb",
    "write_extxyz",
]

logger = logging.getLogger(__name__)

LEVEL_OF_THEORY = "GFN2-xTB"
DEFAULT_SOURCE = "forcecentric-xtb"
SAMPLING_KINDS = ("minimum", "md", "normal_mode")
#: The ``atoms.info`` keys every labelled record carries, in this order.
INFO_KEYS = (
    "equilibrium",
    "source",
    "mol_id",
    "smiles",
    "level_of_theory",
    "charge",
    "sampling",
    "temperature_K",
)

# Bond detection: two atoms are bonded when closer than mult * (r_cov,i + r_cov,j).
_BOND_MULT_MINIMUM = 1.2  # near a minimum: tight, catches rearrangements
_BOND_MULT_FRAME = 1.5  # thermal frames: loose, only a real dissociation counts


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _one_openmp_thread(func):
    """Run ``func`` with OpenMP limited to one thread (if threadpoolctl is available).

    GFN2-xTB on molecules of a few dozen atoms gains nothing from threads, and tblite's OpenMP
    threads spin-wait: when the cores are shared (parallel workers, other jobs) a threaded
    run is 5-30x slower. The limit is lifted again when ``func`` returns. A call at DFT level
    (``dft`` given) keeps its threads: PySCF's integrals and linear algebra use them well.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if kwargs.get("dft") is not None:
            return func(*args, **kwargs)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - optional
            ctx = contextlib.nullcontext()
        else:
            ctx = threadpool_limits(1, user_api="openmp")
        with ctx:
            return func(*args, **kwargs)

    return wrapper


def _name_of(atoms: Atoms) -> str:
    return str(atoms.info.get("mol_id", atoms.get_chemical_formula()))


def _bond_graph(atoms: Atoms, mult: float):
    """Sparse symmetric connectivity matrix from ASE natural (covalent) cutoffs."""
    from ase.neighborlist import NeighborList, natural_cutoffs

    nl = NeighborList(
        natural_cutoffs(atoms, mult=mult), self_interaction=False, bothways=True, skin=0.0
    )
    nl.update(atoms)
    return nl.get_connectivity_matrix(sparse=True).tocsr()


def _n_fragments(atoms: Atoms, mult: float = _BOND_MULT_FRAME) -> int:
    """Number of covalently connected fragments of ``atoms``."""
    from scipy.sparse.csgraph import connected_components

    if len(atoms) == 1:
        return 1
    return int(connected_components(_bond_graph(atoms, mult), directed=False)[0])


def _bond_set(atoms: Atoms, mult: float) -> set[tuple[int, int]]:
    graph = _bond_graph(atoms, mult).tocoo()
    return {(int(i), int(j)) for i, j in zip(graph.row, graph.col) if i < j}


def _level(dft: DFTSettings | None) -> str:
    """The level of theory of a labelling step: GFN2-xTB, or the DFT settings' name."""
    return LEVEL_OF_THEORY if dft is None else dft.level_of_theory


def _calculator(charge: int, accuracy: float = 1.0, dft: DFTSettings | None = None):
    """A fresh ASE calculator at the step's level: GFN2-xTB, or DFT (PySCF) when ``dft`` is given."""
    if dft is None:
        return xtb_calculator(charge, accuracy)
    from .dft import PySCFCalculator, require_pyscf

    require_pyscf()
    return PySCFCalculator(dft, charge=charge)


def _check_finite(name: str, what: str, energy: float, forces: np.ndarray, level: str = LEVEL_OF_THEORY) -> None:
    check_finite_labels(energy, forces,
                        f"molecule {name!r}: {level} returned a non-finite energy or force for {what}")


def _record(
    atoms: Atoms,
    energy: float,
    forces: np.ndarray,
    *,
    equilibrium: bool,
    sampling: str,
    temperature: float,
    source: str | None = None,
    level_of_theory: str = LEVEL_OF_THEORY,
) -> Atoms:
    """A fresh labelled :class:`Atoms` (positions copied, labels in a SinglePointCalculator)."""
    if sampling not in SAMPLING_KINDS:
        raise ValueError(f"sampling must be one of {SAMPLING_KINDS}, got {sampling!r}")
    name = _name_of(atoms)
    forces = np.array(forces, dtype=float, copy=True)
    _check_finite(name, f"a {sampling} frame", float(energy), forces, level_of_theory)
    out = Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions())
    out.info = {
        "equilibrium": bool(equilibrium),
        "source": str(source if source is not None else atoms.info.get("source", DEFAULT_SOURCE)),
        "mol_id": name,
        "smiles": str(atoms.info.get("smiles", "")),
        "level_of_theory": str(level_of_theory),
        "charge": int(atoms.info.get("charge", 0)),
        "sampling": sampling,
        "temperature_K": float(temperature),
    }
    out.calc = SinglePointCalculator(out, energy=float(energy), forces=forces)
    return out


def _fresh_labels(atoms: Atoms, accuracy: float = 1.0, dft: DFTSettings | None = None) -> tuple[float, np.ndarray]:
    """GFN2-xTB (or ``dft``) energy and forces of ``atoms`` from a new calculator (no history).

    Labels never come from the calculator that drove an optimization or a trajectory: its
    wavefunction restart makes results depend (slightly) on the path, and a constraint such as
    ``FixCom`` would alter the forces. A fresh call is reproducible from the geometry alone.
    """
    work = Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions())
    work.calc = _calculator(int(atoms.info.get("charge", 0)), accuracy, dft)
    return float(work.get_potential_energy()), work.get_forces(apply_constraint=False)


def relabel_xtb(records: Sequence, accuracy: float = 1.0, *, file: str | None = None) -> list:
    """The same geometries with GFN2-xTB energies and forces in place of their own labels.

    Each :class:`~forcecentric.data.conformation.Conformation` is copied with fresh GFN2-xTB
    labels (:func:`_fresh_labels`: a new calculator per frame, so each label depends on its
    geometry alone); ``level_of_theory`` becomes GFN2-xTB and the old one is kept in
    ``info["relabelled_from"]``. Used by the study's control target: a DFT target's frames at
    the pre-training corpus's level of theory. A non-finite label raises a
    :class:`~forcecentric.errors.DataError` naming ``file`` (where the frames came from) and the
    frame's position in ``records``. :func:`forcecentric.data.relabel.relabel` does the same
    with DFT labels too.
    """
    from .relabel import relabel

    return relabel(records, "xtb", xtb_accuracy=accuracy, file=file)


_RDKIT_SEED_FOR_0 = 0x5EED


def _seed_int(seed: int | np.random.SeedSequence) -> int:
    """A 31-bit integer seed (RDKit wants a signed int) from an int or SeedSequence."""
    if isinstance(seed, np.random.SeedSequence):
        return int(seed.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)
    return int(seed) & 0x7FFFFFFF


def _rng(seed: int | np.random.SeedSequence) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def embed(
    smiles: str,
    n_conformers: int,
    seed: int = 0,
    *,
    mmff: bool = True,
    name: str | None = None,
) -> list[Atoms]:
    """Embed 3D conformers of a SMILES with RDKit ETKDGv3 (hydrogens added).

    Args:
        smiles: A single connected, closed-shell molecule.
        n_conformers: How many conformers to embed (RDKit may return fewer for tiny molecules).
        seed: ETKDG random seed.
        mmff: Pre-optimize each conformer with MMFF94 when RDKit has parameters for it.
        name: Molecule name, stored as ``info["mol_id"]`` (defaults to the SMILES).

    Returns:
        Unlabelled conformers with ``info`` keys ``mol_id``, ``smiles`` and ``charge``, and
        ``mmff_energy`` (eV) when they were MMFF-optimized.

    Raises:
        DataError: unparsable SMILES, several fragments, open shell, or embedding failure.

    Stereochemistry the SMILES leaves open is fixed once, so that every conformer is of the same
    stereoisomer (the one a first ETKDG embedding with the same seed draws); write it into the
    SMILES (``C[C@H](O)CC``, ``F/C=C/F``) to choose it.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    name = smiles if name is None else name
    if n_conformers < 1:
        raise ValueError(f"n_conformers must be >= 1, got {n_conformers}")
    mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles else None
    if mol is None:
        raise DataError(f"molecule {name!r}: RDKit cannot parse SMILES {smiles!r}")
    if len(Chem.GetMolFrags(mol)) != 1:
        raise DataError(
            f"molecule {name!r}: SMILES {smiles!r} has several disconnected fragments; "
            "only single molecules are supported"
        )
    n_radical = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    if n_radical:
        raise DataError(
            f"molecule {name!r}: SMILES {smiles!r} is open-shell ({n_radical} radical "
            "electrons); only closed-shell molecules are supported"
        )
    charge = int(Chem.GetFormalCharge(mol))

    params = AllChem.ETKDGv3()
    # RDKit derives each conformer's seed from this one, and seed 0 gives every conformer the same
    # coordinates (n copies of one conformer): map it to another fixed seed
    params.randomSeed = _seed_int(seed) or _RDKIT_SEED_FOR_0
    params.numThreads = 1
    # ETKDG draws an unspecified stereocentre or double bond at random for each conformer, so the
    # "conformers" of CC(O)CC(C)N would mix its diastereomers: fix one stereoisomer for all of them
    mol = _fix_open_stereo(Chem.AddHs(mol), params)
    conf_ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(n_conformers), params=params))
    if not conf_ids:
        # Large or strained systems sometimes need random initial coordinates.
        params.useRandomCoords = True
        conf_ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(n_conformers), params=params))
    if not conf_ids:
        raise DataError(f"molecule {name!r}: RDKit ETKDG could not embed SMILES {smiles!r}")
    mmff_energies: list[float] | None = None
    if mmff and AllChem.MMFFHasAllMoleculeParams(mol):
        # one (not_converged, energy in kcal/mol) per conformer, in conformer order
        result = AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=2000)
        mmff_energies = [float(e) * units.kcal / units.mol for _, e in result]

    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    out = []
    for k, cid in enumerate(conf_ids):
        atoms = Atoms(numbers=numbers, positions=mol.GetConformer(cid).GetPositions())
        atoms.info.update(mol_id=str(name), smiles=str(smiles), charge=charge)
        if mmff_energies is not None:
            atoms.info["mmff_energy"] = mmff_energies[k]
        out.append(atoms)
    return out


def _fix_open_stereo(mol, params):
    """``mol`` (with hydrogens) with every stereocentre and double bond its SMILES left open set to
    those of one ETKDG embedding with ``params``: a stereoisomer that exists in 3D (enumerating
    them instead can give impossible ones, such as a bridged bicycle's inconsistent bridgeheads,
    on which ETKDG spends minutes). Unchanged when nothing is open or the probe does not embed."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    if not any(s.specified == Chem.StereoSpecified.Unspecified for s in Chem.FindPotentialStereo(mol)):
        return mol
    probe = Chem.Mol(mol)
    if AllChem.EmbedMolecule(probe, params) < 0:
        return mol
    Chem.AssignStereochemistryFrom3D(probe)
    probe.RemoveAllConformers()
    return probe


def stereo_smiles(atoms: Atoms, smiles: str | None = None) -> str:
    """The stereoisomer a geometry is, as canonical isomeric SMILES: the molecule's graph from
    ``smiles`` (default ``atoms.info["smiles"]``), with its atoms in the order :func:`embed` writes
    them (the SMILES's heavy atoms, then the hydrogens RDKit adds), and the stereocentres and
    double bonds read from the positions. Use it to see which stereoisomer a labelled record is,
    or whether two records are the same one.

    Raises:
        DataError: no SMILES, or one whose atoms (with hydrogens) do not match the record's.
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    smiles = atoms.info.get("smiles") if smiles is None else smiles
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        raise DataError(f"molecule {_name_of(atoms)!r}: no parsable SMILES to read its stereochemistry against")
    mol = Chem.AddHs(mol)
    if [a.GetAtomicNum() for a in mol.GetAtoms()] != list(atoms.numbers):
        raise DataError(f"molecule {_name_of(atoms)!r}: its atoms are not SMILES {smiles!r}'s in embed's order")
    conf = Chem.Conformer(mol.GetNumAtoms())
    for k, (x, y, z) in enumerate(np.asarray(atoms.positions, dtype=float)):
        conf.SetAtomPosition(k, Point3D(float(x), float(y), float(z)))
    mol.AddConformer(conf, assignId=True)
    Chem.AssignStereochemistryFrom3D(mol)
    return Chem.MolToSmiles(Chem.RemoveHs(mol))


def rank_conformers(
    conformers: Sequence[Atoms], dist_tol: float = 0.05, energy_tol: float = 2e-3
) -> tuple[list[Atoms], list[Atoms]]:
    """Sort MMFF-optimized conformers from :func:`embed` into starting points for the minima.

    Returns one conformer of each distinct MMFF minimum, lowest MMFF energy first, and the
    repeats (same sorted interatomic distances within ``dist_tol`` Å and MMFF energy within
    ``energy_tol`` eV, the test :func:`label_molecule` applies to its minima), also by energy.
    ETKDG draws some rotamers far more often than others (of ethanol's 30 conformers with the
    labeller's seed, 27 are gauche), so taking conformers in embedding order can spend every
    optimization on one minimum; taking the distinct MMFF minima reaches the others at the cost
    of a force-field screen (a tenth of a second for 50 conformers of ethanol).

    Raises:
        ValueError: a conformer has no ``info["mmff_energy"]`` (RDKit had no MMFF94 parameters
        for the molecule, or ``embed(..., mmff=False)``).
    """
    missing = [k for k, c in enumerate(conformers) if "mmff_energy" not in c.info]
    if missing:
        raise ValueError(f"conformers {missing[:5]} have no MMFF energy to rank them by (embed with mmff=True)")
    order = sorted(range(len(conformers)), key=lambda k: conformers[k].info["mmff_energy"])
    distinct: list[int] = []
    repeats: list[int] = []
    for k in order:
        c = conformers[k]
        same = any(
            _same_geometry(c, conformers[j], c.info["mmff_energy"], conformers[j].info["mmff_energy"],
                           dist_tol, energy_tol)
            for j in distinct
        )
        (repeats if same else distinct).append(k)
    return [conformers[k] for k in distinct], [conformers[k] for k in repeats]


def xtb_calculator(charge: int = 0, accuracy: float = 1.0):
    """A tblite ASE calculator for GFN2-xTB (closed shell, silent).

    tblite is imported here, not at module import, so worker processes can set
    ``OMP_NUM_THREADS`` before its OpenMP runtime starts.
    """
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", charge=int(charge), accuracy=float(accuracy), verbosity=0)


@_one_openmp_thread
def optimize_minimum(
    atoms: Atoms,
    fmax: float = 0.01,
    steps: int = 500,
    *,
    accuracy: float = 1.0,
    source: str | None = None,
    dft: DFTSettings | None = None,
) -> Atoms:
    """Minimize a conformer with GFN2-xTB, or DFT, (ASE BFGS) and return it labelled as a minimum.

    Args:
        atoms: A conformer from :func:`embed` (``info`` gives ``mol_id``, ``smiles``, ``charge``).
        fmax: Convergence threshold on the largest atomic force norm (eV/Å).
        steps: Maximum number of optimizer steps.
        accuracy: tblite accuracy (lower is tighter).
        source: ``info["source"]`` of the record.
        dft: minimize at this DFT level (PySCF) instead of GFN2-xTB, e.g. to move a GFN2-xTB
            minimum to the reference's own; each step costs a DFT gradient.

    Returns:
        A new labelled :class:`Atoms` with ``equilibrium=True``, ``sampling="minimum"``,
        ``temperature_K=0.0``; its recorded forces are the (near-zero) forces at that level.

    Raises:
        DataError: not converged within ``steps``, or the bond graph changed during the
        optimization (the molecule fragmented or rearranged into something else).
    """
    from ase.optimize import BFGS

    name = _name_of(atoms)
    level = _level(dft)
    work = atoms.copy()
    work.info = dict(atoms.info)
    n_frag0 = _n_fragments(work, _BOND_MULT_MINIMUM)
    bonds0 = _bond_set(work, _BOND_MULT_MINIMUM)
    work.calc = _calculator(int(atoms.info.get("charge", 0)), accuracy, dft)
    opt = BFGS(work, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    if dft is None:
        energy, forces = _fresh_labels(work, accuracy)
    else:  # a PySCF calculation has no history: its last result is already a fresh label
        energy, forces = float(work.get_potential_energy()), work.get_forces(apply_constraint=False)
    _check_finite(name, "a geometry optimization", energy, forces, level)
    fmax_reached = float(np.linalg.norm(forces, axis=1).max())
    if fmax_reached >= fmax and opt.nsteps < steps:
        # Converged with the restarted wavefunction but not quite from a fresh start
        # (differences ~1e-4 eV/Å): tighten a little within the remaining budget.
        opt.run(fmax=0.5 * fmax, steps=steps - opt.nsteps)
        energy, forces = _fresh_labels(work, accuracy, dft)
        _check_finite(name, "a geometry optimization", energy, forces, level)
        fmax_reached = float(np.linalg.norm(forces, axis=1).max())
    n_frag1 = _n_fragments(work, _BOND_MULT_MINIMUM)
    if n_frag1 > n_frag0:
        raise DataError(
            f"molecule {name!r}: fragmented during {level} optimization "
            f"({n_frag0} -> {n_frag1} covalently bonded fragments)"
        )
    bonds1 = _bond_set(work, _BOND_MULT_MINIMUM)
    if bonds1 != bonds0:
        broken = sorted(bonds0 - bonds1)
        formed = sorted(bonds1 - bonds0)
        raise DataError(
            f"molecule {name!r}: bonds changed during {level} optimization "
            f"(broken {broken}, formed {formed}); the minimum is not the input molecule"
        )
    if fmax_reached >= fmax:
        raise DataError(
            f"molecule {name!r}: {level} optimization did not converge in {steps} steps "
            f"(max force {fmax_reached:.4f} eV/Å > fmax {fmax} eV/Å)"
        )
    return _record(work, energy, forces, equilibrium=True, sampling="minimum", temperature=0.0, source=source,
                   level_of_theory=level)


@_one_openmp_thread
def sample_md(
    minimum: Atoms,
    temperatures: Sequence[float] = (300.0, 600.0, 900.0),
    n_frames: int = 10,
    interval_steps: int = 40,
    timestep_fs: float = 0.5,
    seed: int | np.random.SeedSequence = 0,
    *,
    equilibration_steps: int = 200,
    friction_per_fs: float = 0.02,
    accuracy: float = 1.0,
    source: str | None = None,
    dft: DFTSettings | None = None,
) -> list[Atoms]:
    """Short GFN2-xTB (or DFT) Langevin MD from a minimum; keep labelled frames at a fixed interval.

    For each temperature: Maxwell–Boltzmann velocities at ``T`` (no net momentum or rotation),
    ``equilibration_steps`` discarded, then ``n_frames`` frames kept every ``interval_steps``.

    Args:
        minimum: Start geometry (a record from :func:`optimize_minimum`).
        temperatures: Thermostat temperatures in K (one trajectory each).
        n_frames: Frames kept per temperature.
        interval_steps: MD steps between kept frames (decorrelation).
        timestep_fs: Time step in fs.
        seed: Seed for velocities and the Langevin noise.
        equilibration_steps: Steps discarded before the first frame.
        friction_per_fs: Langevin friction in 1/fs.
        accuracy: tblite accuracy.
        source: ``info["source"]`` of the records.
        dft: run the dynamics at this DFT level (ab initio MD, a DFT gradient per step).

    Returns:
        Labelled frames with ``equilibrium=False``, ``sampling="md"``, ``temperature_K=T``.
    """
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    try:  # ASE >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta as thermalize
    except ImportError:  # pragma: no cover - older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize

    if n_frames < 0 or interval_steps < 1 or equilibration_steps < 0:
        raise ValueError("need n_frames >= 0, interval_steps >= 1, equilibration_steps >= 0")
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    frames: list[Atoms] = []
    temps = list(temperatures)
    for T, child in zip(temps, seq.spawn(len(temps))):
        if n_frames == 0:
            continue
        rng = _rng(child)
        atoms = Atoms(numbers=minimum.get_atomic_numbers(), positions=minimum.get_positions())
        atoms.info = {k: v for k, v in minimum.info.items() if k in ("mol_id", "smiles", "charge")}
        atoms.calc = _calculator(int(minimum.info.get("charge", 0)), accuracy, dft)
        atoms.set_constraint(FixCom())  # no centre-of-mass drift (ASE's recommended form)
        thermalize(atoms, temperature_K=float(T), rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        dyn = Langevin(
            atoms,
            timestep=timestep_fs * units.fs,
            temperature_K=float(T),
            friction=friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
            logfile=None,
        )
        if equilibration_steps:
            dyn.run(equilibration_steps)
        for _ in range(n_frames):
            dyn.run(interval_steps)
            energy, forces = _fresh_labels(atoms, accuracy, dft)
            frames.append(
                _record(
                    atoms,
                    energy,
                    forces,
                    equilibrium=False,
                    sampling="md",
                    temperature=float(T),
                    source=source,
                    level_of_theory=_level(dft),
                )
            )
    return frames


def _rigid_basis(positions: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Orthonormal basis (3N, 5 or 6) of mass-weighted translations and rotations."""
    n = len(masses)
    sqm = np.sqrt(masses)
    com = (masses[:, None] * positions).sum(0) / masses.sum()
    r = positions - com
    vecs = []
    for a in range(3):
        t = np.zeros((n, 3))
        t[:, a] = sqm
        vecs.append(t.ravel())
    for a in range(3):
        axis = np.zeros(3)
        axis[a] = 1.0
        vecs.append((np.cross(axis, r) * sqm[:, None]).ravel())
    mat = np.array(vecs).T
    u, s, _ = np.linalg.svd(mat, full_matrices=False)
    rank = int((s > 1e-6 * s.max()).sum())  # 5 for a linear molecule, 6 otherwise
    return u[:, :rank]


@_one_openmp_thread
def normal_modes(
    minimum: Atoms, *, delta: float = 0.01, accuracy: float = 1.0, dft: DFTSettings | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vibrational normal modes of a minimum from the GFN2-xTB (or ``dft``) Hessian (ASE ``Vibrations``).

    The Hessian (central differences, step ``delta`` Å) is mass-weighted, the 6 (5 if linear)
    rigid translations and rotations are projected out exactly, and the remaining block is
    diagonalized. At DFT level (``dft``) the Hessian costs 6N DFT gradients.

    Returns:
        ``(modes, reduced_masses, eigenvalues)``: Cartesian unit displacement vectors
        ``(3N-6, N, 3)``, reduced masses in amu, and mass-weighted eigenvalues ω² in
        eV/(Å²·amu) (negative for imaginary modes), in ascending order.
    """
    from ase.vibrations import Vibrations

    work = Atoms(numbers=minimum.get_atomic_numbers(), positions=minimum.get_positions())
    work.calc = _calculator(int(minimum.info.get("charge", 0)), accuracy, dft)
    with tempfile.TemporaryDirectory(prefix="fc-vib-") as tmp:
        vib = Vibrations(work, name=str(Path(tmp) / "vib"), delta=delta, nfree=2)
        vib.run()
        hessian = vib.get_vibrations().get_hessian_2d()  # eV/Å², (3N, 3N)
    hessian = 0.5 * (hessian + hessian.T)
    masses = work.get_masses()
    inv_sqm = np.repeat(1.0 / np.sqrt(masses), 3)
    h_mw = hessian * inv_sqm[:, None] * inv_sqm[None, :]
    rigid = _rigid_basis(work.get_positions(), masses)
    # Orthonormal complement of the rigid space = internal (vibrational) coordinates.
    u, _, _ = np.linalg.svd(rigid, full_matrices=True)
    internal = u[:, rigid.shape[1] :]
    eigvals, eigvecs = np.linalg.eigh(internal.T @ h_mw @ internal)
    mw_modes = internal @ eigvecs  # (3N, n_vib) mass-weighted unit vectors
    cart = mw_modes * inv_sqm[:, None]
    norms = np.linalg.norm(cart, axis=0)
    reduced_masses = 1.0 / norms**2
    modes = (cart / norms).T.reshape(-1, len(work), 3)
    return modes, reduced_masses, eigvals


@_one_openmp_thread
def sample_normal_modes(
    minimum: Atoms,
    n_samples: int,
    temperature: float = 300.0,
    seed: int | np.random.SeedSequence = 0,
    *,
    min_wavenumber: float = 100.0,
    modes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    accuracy: float = 1.0,
    source: str | None = None,
    dft: DFTSettings | None = None,
) -> list[Atoms]:
    """Normal-mode sampling at a temperature, as in ANI-1 (Smith et al., Chem. Sci. 2017).

    For each sample, ``N_f = 3N - 6`` (or ``3N - 5``) random numbers ``c_i ~ U(0, 1)`` are
    drawn and rescaled so that ``Σ c_i`` is itself ``U(0, 1)``; mode ``i`` is displaced by
    ``R_i = ± sqrt(3 c_i N_a k_B T / K_i)`` (random sign) along its Cartesian unit vector,
    where ``K_i = μ_i ω_i²`` is the mode's force constant. The harmonic energy of a sample is
    thus ``(3/2) N_a k_B T Σ c_i`` — Boltzmann-scale distortions that stay near the minimum.
    Frequencies below ``min_wavenumber`` (soft torsions, numerically near-zero or imaginary
    modes) are raised to it, which caps their otherwise unbounded amplitudes.

    Args:
        minimum: A minimum (from :func:`optimize_minimum`).
        n_samples: Number of displaced geometries.
        temperature: Temperature in K.
        seed: Random seed.
        min_wavenumber: Frequency floor in cm⁻¹ used for the amplitudes.
        modes: Precomputed :func:`normal_modes` output (saves a Hessian); it may come from
            another level than the labels, e.g. a DFT Hessian with cheap GFN2-xTB labels that
            ``forcecentric relabel`` replaces later.
        accuracy: tblite accuracy.
        source: ``info["source"]`` of the records.
        dft: label the samples (and compute the Hessian, when ``modes`` is None) at this DFT
            level instead of GFN2-xTB.

    Returns:
        Labelled frames with ``equilibrium=False``, ``sampling="normal_mode"``.
    """
    if n_samples <= 0:
        return []
    if modes is None:
        modes = normal_modes(minimum, accuracy=accuracy, dft=dft)
    vecs, mu, eigvals = modes
    # ħω (eV) = s * sqrt(λ) with λ in eV/(Å² amu), as in ase.vibrations.VibrationsData.
    s = units._hbar * 1e10 / math.sqrt(units._e * units._amu)
    lam_floor = (min_wavenumber * units.invcm / s) ** 2
    k_const = np.maximum(eigvals, lam_floor) * mu  # eV/Å²
    n_atoms = len(minimum)
    n_modes = len(k_const)
    kT = units.kB * float(temperature)
    rng = _rng(seed)
    x0 = minimum.get_positions()
    work = Atoms(numbers=minimum.get_atomic_numbers(), positions=x0)
    work.info = {k: minimum.info[k] for k in ("mol_id", "smiles", "charge") if k in minimum.info}
    frames = []
    for _ in range(n_samples):
        c = rng.uniform(0.0, 1.0, n_modes)
        c *= rng.uniform(0.0, 1.0) / c.sum()
        sign = rng.choice((-1.0, 1.0), n_modes)
        amp = sign * np.sqrt(3.0 * c * n_atoms * kT / k_const)
        work.set_positions(x0 + np.tensordot(amp, vecs, axes=1))
        energy, forces = _fresh_labels(work, accuracy, dft)
        frames.append(
            _record(
                work,
                energy,
                forces,
                equilibrium=False,
                sampling="normal_mode",
                temperature=float(temperature),
                source=source,
                level_of_theory=_level(dft),
            )
        )
    return frames


def filter_frames(
    frames: Iterable[Atoms],
    max_force: float = 10.0,
    min_distance: float = 0.5,
    *,
    max_fragments: int | None = None,
) -> tuple[list[Atoms], list[tuple[int, str]]]:
    """Drop outlier frames: large forces, near collisions, or (optionally) dissociation.

    Args:
        frames: Labelled frames.
        max_force: Largest allowed absolute force component, eV/Å.
        min_distance: Smallest allowed interatomic distance, Å.
        max_fragments: If given, drop frames that fall into more covalently connected
            fragments than this (loose cutoffs, 1.5 × covalent radii).

    Returns:
        ``(kept, dropped)`` with ``dropped`` a list of ``(index, reason)``.

    Raises:
        DataError: a frame has a non-finite force (never silently dropped).
    """
    kept: list[Atoms] = []
    dropped: list[tuple[int, str]] = []
    for i, atoms in enumerate(frames):
        forces = atoms.get_forces()
        if not np.all(np.isfinite(forces)):
            raise DataError(f"molecule {_name_of(atoms)!r}: non-finite forces", record=i)
        fmax = float(np.abs(forces).max()) if forces.size else 0.0
        dmin, _ = closest_pair(atoms.get_positions())
        if fmax > max_force:
            dropped.append((i, f"max |force| {fmax:.2f} eV/Å > {max_force} eV/Å"))
        elif dmin < min_distance:
            dropped.append((i, f"atoms {dmin:.3f} Å apart < {min_distance} Å"))
        elif max_fragments is not None and (nf := _n_fragments(atoms)) > max_fragments:
            dropped.append((i, f"molecule fell apart into {nf} fragments"))
        else:
            kept.append(atoms)
    return kept, dropped


# --------------------------------------------------------------------------------------------
# one molecule, many molecules
# --------------------------------------------------------------------------------------------


def _same_geometry(a: Atoms, b: Atoms, energy_a: float, energy_b: float, dist_tol: float = 0.05,
                   energy_tol: float = 2e-3) -> bool:
    """Same conformer up to rotation, translation and atom permutation (sorted distances), given
    each one's energy (eV) at the level that optimized it."""
    if abs(energy_a - energy_b) > energy_tol:
        return False
    da = np.sort(a.get_all_distances()[np.triu_indices(len(a), k=1)])
    db = np.sort(b.get_all_distances()[np.triu_indices(len(b), k=1)])
    return bool(np.abs(da - db).max() < dist_tol)


def _same_minimum(a: Atoms, b: Atoms, dist_tol: float = 0.05, energy_tol: float = 2e-3) -> bool:
    """Same labelled minimum (energies from their calculators), as :func:`_same_geometry`."""
    return _same_geometry(a, b, a.get_potential_energy(), b.get_potential_energy(), dist_tol, energy_tol)


def _split(total: int, parts: int, offset: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal integers, extras rotated by ``offset``."""
    base, extra = divmod(total, parts)
    counts = [base] * parts
    for k in range(extra):
        counts[(offset + k) % parts] += 1
    return counts


@_one_openmp_thread
def label_molecule(
    name: str,
    smiles: str,
    n_conformers: int = 3,
    md_frames_per_T: int = 2,
    temperatures: Sequence[float] = (300.0, 600.0, 900.0),
    n_normal_mode: int = 2,
    seed: int = 0,
    *,
    normal_mode_temperatures: Sequence[float] = (300.0, 500.0),
    n_embed: int | None = None,
    n_screen: int = 0,
    mmff: bool = True,
    fmax: float = 0.01,
    opt_steps: int = 500,
    interval_steps: int = 40,
    equilibration_steps: int = 200,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.02,
    min_wavenumber: float = 100.0,
    max_force: float = 10.0,
    min_distance: float = 0.5,
    accuracy: float = 1.0,
    source: str = DEFAULT_SOURCE,
    dropped: list[tuple[str, str, float, str]] | None = None,
    dft: DFTSettings | None = None,
) -> list[Atoms]:
    """Label one molecule: distinct GFN2-xTB (or ``dft``) minima, thermal MD frames, normal-mode samples.

    ``n_embed`` ETKDG conformers (default ``3 * n_conformers``) are optimized in turn until
    ``n_conformers`` distinct minima are found (rigid molecules have one). With ``n_screen`` > 0,
    that many conformers are embedded and MMFF-optimized first, and the conformers optimized
    are the distinct MMFF minima, lowest first, at most ``n_embed`` (:func:`rank_conformers`);
    the repeats are tried only if none of them reaches a valid minimum. ETKDG's own draws can
    miss a rotamer (ethanol's 9 default conformers are all gauche; screening 50 reaches trans
    with 2 optimizations), and a rigid molecule costs one optimization instead of ``n_embed``.
    ``n_screen=0`` (the default here, and what the bundled data used) takes the conformers in
    embedding order; ``forcecentric label`` screens 50. Thermal samples are
    spread over the minima: at each MD temperature ``md_frames_per_T`` frames in total, and at
    each normal-mode temperature ``n_normal_mode`` samples in total, each minimum running its
    own trajectory / displacements. Frames failing :func:`filter_frames` are dropped and, when
    ``dropped`` is a list, appended to it as ``(mol_id, sampling, temperature_K, reason)``.

    Returns:
        Minima first (``equilibrium=True``), then MD frames, then normal-mode frames.

    Raises:
        DataError: bad SMILES, or no conformer reached a valid minimum (the reasons of the
        failed optimizations are in the message).
    """
    seq = np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])
    s_embed, s_md, s_nm = seq.spawn(3)
    n_embed = 3 * n_conformers if n_embed is None else max(int(n_embed), n_conformers)
    fallback: list[Atoms] = []  # tried only if no conformer of the first list reaches a minimum
    if n_screen and n_screen > 0:
        if not mmff:
            raise ValueError("n_screen ranks conformers by their MMFF energies: it needs mmff=True")
        conformers = embed(smiles, max(int(n_screen), n_embed), _seed_int(s_embed), mmff=True, name=name)
        if all("mmff_energy" in c.info for c in conformers):
            conformers, fallback = rank_conformers(conformers)
        else:
            logger.warning("molecule %r: RDKit has no MMFF94 parameters for it; conformers not screened", name)
        conformers, fallback = conformers[:n_embed], fallback[:n_embed]
    else:
        conformers = embed(smiles, n_embed, _seed_int(s_embed), mmff=mmff, name=name)

    minima: list[Atoms] = []
    problems: list[str] = []
    for k, conf in enumerate(conformers + fallback):
        if len(minima) >= n_conformers or (minima and k >= len(conformers)):
            break
        try:
            m = optimize_minimum(conf, fmax=fmax, steps=opt_steps, accuracy=accuracy, source=source, dft=dft)
        except DataError as exc:
            problems.append(f"conformer {k}: {exc}")
            logger.warning("%s", exc)
            continue
        if not any(_same_minimum(m, other) for other in minima):
            minima.append(m)
    if not minima:
        raise DataError(
            f"molecule {name!r}: no conformer reached a valid {_level(dft)} minimum: "
            + "; ".join(problems)
        )

    n_frag = max(_n_fragments(m) for m in minima)
    records: list[Atoms] = list(minima)

    def keep(frames: list[Atoms]) -> list[Atoms]:
        kept, bad = filter_frames(
            frames, max_force=max_force, min_distance=min_distance, max_fragments=n_frag
        )
        for i, reason in bad:
            info = frames[i].info
            logger.info("dropped %s %s frame at %g K: %s", name, info["sampling"],
                        info["temperature_K"], reason)
            if dropped is not None:
                dropped.append((name, info["sampling"], info["temperature_K"], reason))
        return kept

    md_seeds = s_md.spawn(max(1, len(temperatures) * len(minima)))
    for t_idx, T in enumerate(temperatures):
        for j, n in enumerate(_split(md_frames_per_T, len(minima), t_idx)):
            if n:
                records += keep(
                    sample_md(
                        minima[j],
                        temperatures=(T,),
                        n_frames=n,
                        interval_steps=interval_steps,
                        timestep_fs=timestep_fs,
                        seed=md_seeds[t_idx * len(minima) + j],
                        equilibration_steps=equilibration_steps,
                        friction_per_fs=friction_per_fs,
                        accuracy=accuracy,
                        source=source,
                        dft=dft,
                    )
                )

    nm_seeds = s_nm.spawn(max(1, len(normal_mode_temperatures) * len(minima)))
    mode_cache: dict[int, Any] = {}
    for t_idx, T in enumerate(normal_mode_temperatures):
        for j, n in enumerate(_split(n_normal_mode, len(minima), t_idx)):
            if not n:
                continue
            if j not in mode_cache:
                mode_cache[j] = normal_modes(minima[j], accuracy=accuracy, dft=dft)
            records += keep(
                sample_normal_modes(
                    minima[j],
                    n,
                    temperature=T,
                    seed=nm_seeds[t_idx * len(minima) + j],
                    min_wavenumber=min_wavenumber,
                    modes=mode_cache[j],
                    accuracy=accuracy,
                    source=source,
                    dft=dft,
                )
            )
    return records


def _init_worker() -> None:
    # One OpenMP thread per worker; set before tblite (imported lazily) starts its runtime.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def _label_task(name: str, smiles: str, kwargs: dict[str, Any]):
    """Worker entry point: never raises, returns (records, dropped, error)."""
    dropped: list[tuple[str, str, float, str]] = []
    try:
        records = label_molecule(name, smiles, dropped=dropped, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the caller as a failure
        reason = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        return [], dropped, reason
    return records, dropped, None


def label_molecules(
    molecules: Sequence[tuple[str, str] | tuple[str, str, dict[str, Any]]],
    n_conformers: int = 3,
    md_frames_per_T: int = 2,
    temperatures: Sequence[float] = (300.0, 600.0, 900.0),
    n_normal_mode: int = 2,
    seed: int = 0,
    *,
    n_workers: int = 2,
    dropped: list[tuple[str, str, float, str]] | None = None,
    **kwargs: Any,
) -> tuple[list[Atoms], list[tuple[str, str]]]:
    """Label many molecules in parallel processes, collecting failures instead of stopping.

    Each molecule runs :func:`label_molecule` in a worker process (``spawn`` start method,
    ``OMP_NUM_THREADS=1``); with ``n_workers <= 1`` everything runs in this process. Per-molecule
    random streams depend only on ``(seed, name)``, so the output does not depend on scheduling.
    As with any ``spawn`` pool, a calling script needs an ``if __name__ == "__main__":`` guard
    (and cannot be read from stdin); a worker that dies is reported as a failure.

    Args:
        molecules: ``(name, smiles)`` pairs, or ``(name, smiles, overrides)`` where
            ``overrides`` is a dict of :func:`label_molecule` keyword arguments for that
            molecule only (e.g. more MD frames for a target molecule); names must be unique.
        n_conformers, md_frames_per_T, temperatures, n_normal_mode, seed: see
            :func:`label_molecule`.
        n_workers: Number of worker processes.
        dropped: If a list, filtered-out frames are appended as
            ``(mol_id, sampling, temperature_K, reason)``.
        **kwargs: Further keyword arguments of :func:`label_molecule`.

    Returns:
        ``(records, failures)``: records in the input molecule order, and ``(name, reason)``
        for each molecule that could not be labelled.
    """
    entries = []
    for entry in molecules:
        if len(entry) not in (2, 3):
            raise ValueError(f"expected (name, smiles) or (name, smiles, overrides), got {entry!r}")
        entries.append((str(entry[0]), str(entry[1]), dict(entry[2]) if len(entry) == 3 else {}))
    names = [n for n, _, _ in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"duplicate molecule names: {dup}")
    for name, smi, _ in entries:  # fail now, not when writing hours of labels
        for what, value in (("name", name), ("SMILES", smi)):
            problem = _extxyz_string_problem(value)
            if problem:
                raise DataError(f"molecule {name!r}: {what} {problem}")
    task_kwargs = dict(
        kwargs,
        n_conformers=n_conformers,
        md_frames_per_T=md_frames_per_T,
        temperatures=tuple(float(t) for t in temperatures),
        n_normal_mode=n_normal_mode,
        seed=seed,
    )
    results: dict[str, tuple[list[Atoms], list, str | None]] = {}
    if n_workers <= 1 or len(entries) <= 1:
        for name, smi, extra in entries:
            results[name] = _label_task(name, smi, {**task_kwargs, **extra})
    else:
        with process_pool(min(n_workers, len(entries)), initializer=_init_worker) as pool:
            futures = {
                pool.submit(_label_task, name, smi, {**task_kwargs, **extra}): name
                for name, smi, extra in entries
            }
            for fut in cf.as_completed(futures):
                name = futures[fut]
                try:
                    results[name] = fut.result()
                except Exception as exc:  # worker died (e.g. BrokenProcessPool)
                    results[name] = ([], [], f"worker process failed: {type(exc).__name__}: {exc}")
    records: list[Atoms] = []
    failures: list[tuple[str, str]] = []
    for name in names:
        recs, drops, err = results[name]
        records += recs
        if dropped is not None:
            dropped += drops
        if err is not None:
            logger.warning("failed to label %s: %s", name, err)
            failures.append((name, err))
    return records, failures


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _extxyz_string_problem(value: str) -> str | None:
    """Why an extxyz comment-line string would not read back unchanged (None if it would)."""
    from ase.io.extxyz import key_val_dict_to_str, key_val_str_to_dict

    back = key_val_str_to_dict(key_val_dict_to_str({"k": value}))["k"]
    if isinstance(back, str) and back == value:
        return None
    return (
        f"{value!r} would be read back from extxyz as {back!r} (avoid numeric or boolean "
        "strings and backslashes; write cis double bonds as e.g. C(/O)=C/C=O)"
    )


def _check_info_round_trip(atoms_list: Sequence[Atoms], path: Path) -> None:
    """Refuse string info values that extxyz would read back as something else."""
    seen: set[str] = set()
    for i, atoms in enumerate(atoms_list):
        for key, value in atoms.info.items():
            if isinstance(value, str) and value not in seen:
                problem = _extxyz_string_problem(value)
                if problem:
                    raise DataError(f"info[{key!r}]: {problem}", file=str(path), record=i)
                seen.add(value)


def write_extxyz(
    path: str | os.PathLike, atoms_list: Sequence[Atoms], *, require_forces: bool = True
) -> Path:
    """Write labelled records to an extended-XYZ file atomically.

    The file is written to a temporary file in the same directory and moved into place with
    :func:`os.replace`, so readers never see a half-written file. Energies and forces come from
    each record's calculator; ``ase.io.read(path, ":")`` gives back the same energies, forces
    and ``info`` keys (booleans included). With ``require_forces=False`` records need only an
    energy (property records such as :func:`label_properties` makes); forces present are still
    checked.

    Raises:
        DataError: a record has no energy/forces, non-finite labels, or a string ``info`` value
        that would not survive the round trip.
    """
    import ase.io

    path = Path(path)
    atoms_list = list(atoms_list)
    for i, atoms in enumerate(atoms_list):
        if atoms.calc is None:
            raise DataError("record has no energy/forces (no calculator)", file=str(path), record=i)
        try:
            e = atoms.get_potential_energy()
            if not require_forces and "forces" not in atoms.calc.results:
                f = np.zeros(0)
            else:
                f = atoms.get_forces()
        except PropertyNotImplementedError as exc:
            raise DataError(
                f"record has no {'energy/forces' if require_forces else 'energy'} ({exc})",
                file=str(path), record=i,
            ) from None
        check_finite_labels(e, f, "non-finite energy or forces", file=str(path), record=i)
    _check_info_round_trip(atoms_list, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            ase.io.write(fh, atoms_list, format="extxyz")
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Molecule input and sharded, resumable labelling runs (``forcecentric label``)
# ----------------------------------------------------------------------------------------------


def _plain_smiles(smiles: str) -> str:
    """Canonical SMILES without stereo marks ('/' and '\\' do not survive extxyz comments)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return smiles
    return Chem.MolToSmiles(mol, isomericSmiles=False)


def read_molecules(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(name, smiles)`` pairs from a SMILES file, an SDF or any ASE-readable structure file.

    * ``.smi`` / ``.txt`` / ``.csv``: one molecule per line, ``SMILES [name]`` (whitespace or
      comma separated; a header line whose first field is ``smiles`` is skipped);
    * ``.sdf`` / ``.mol``: RDKit, names from the title line (or the record index);
    * anything else: read with ASE, bonds perceived with RDKit's ``DetermineBonds``.
    Names are made unique and safe for extxyz; stereo marks are dropped from the SMILES.
    """
    from rdkit import Chem

    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", file=str(path))
    pairs: list[tuple[str, str]] = []
    suffix = path.suffix.lower()
    if suffix in (".smi", ".txt", ".csv", ".smiles"):
        for i, line in enumerate(path.read_text().splitlines()):
            fields = [f for f in line.replace(",", " ").split() if f]
            if not fields or fields[0].startswith("#"):
                continue
            if i == 0 and fields[0].lower() == "smiles":
                continue
            smi = fields[0]  # an invalid SMILES is reported as a failed molecule by the labeller
            pairs.append((fields[1] if len(fields) > 1 else f"mol{i:06d}", smi))
    elif suffix in (".sdf", ".mol"):
        supplier = Chem.SDMolSupplier(str(path), removeHs=False)
        for i, mol in enumerate(supplier):
            if mol is None:
                raise DataError("RDKit cannot parse this molecule", file=str(path), record=i)
            title = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
            pairs.append((title or f"mol{i:06d}", Chem.MolToSmiles(Chem.RemoveHs(mol))))
    else:
        import ase.io
        from rdkit.Chem import rdDetermineBonds

        for i, atoms in enumerate(ase.io.iread(str(path))):
            xyz = f"{len(atoms)}\n\n" + "\n".join(
                f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)
            )
            mol = Chem.MolFromXYZBlock(xyz)
            try:
                rdDetermineBonds.DetermineBonds(mol, charge=int(atoms.info.get("charge", 0)))
            except Exception as exc:
                raise DataError(f"cannot perceive bonds: {exc}", file=str(path), record=i) from None
            pairs.append((str(atoms.info.get("mol_id", f"mol{i:06d}")), Chem.MolToSmiles(Chem.RemoveHs(mol))))
    if not pairs:
        raise DataError("no molecules found", file=str(path))
    out, seen = [], {}
    for name, smi in pairs:
        safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name) or "mol"
        if safe[0].isdigit() or safe.lower() in ("true", "false", "t", "f"):
            safe = "m_" + safe
        k = seen.get(safe, 0)
        seen[safe] = k + 1
        out.append((safe if k == 0 else f"{safe}_{k}", _plain_smiles(smi)))
    return out


def label_to_shards(
    molecules: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    molecules_per_shard: int = 50,
    n_workers: int = 2,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Label ``molecules`` into ``out_dir/shard-NNNNN.extxyz`` files, resumably.

    Each shard holds the records of ``molecules_per_shard`` molecules and is written atomically,
    so a killed run resumes at the first missing shard (same molecules, same settings: the
    settings are recorded in ``label_settings.json`` and a resume with other settings is refused).
    Molecules that fail (bad SMILES, SCF or optimization failure, fragmentation) are listed in
    ``failures.csv`` and do not stop the run. Returns a report (also ``label_report.json``).
    """
    import csv
    import io
    import json
    import time

    from .store import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    dft = settings.get("dft")
    level = _level(dft)
    record = {
        "method": level,
        "program": f"tblite {version('tblite')}" if dft is None else f"pyscf {version('pyscf')}",
        "conformers": f"RDKit ETKDGv3 (+ MMFF), minima optimized with {level}",
        "molecules_per_shard": molecules_per_shard,
        "n_molecules": len(molecules),
        "molecules_sha": zlib.crc32("\n".join(f"{n} {s}" for n, s in molecules).encode()),
        "settings": {k: (list(v) if isinstance(v, tuple) else dataclasses.asdict(v) if k == "dft" else v)
                     for k, v in sorted(settings.items()) if not (k == "dft" and v is None)},
    }
    settings_file = out / "label_settings.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        if old != record:
            raise DataError(
                "this folder was labelled with other molecules or settings; use a new --out "
                f"(recorded: {old.get('settings')}, n_molecules={old.get('n_molecules')})",
                file=str(settings_file),
            )
    else:
        atomic_write_text(settings_file, json.dumps(record, indent=2))
    failures_file = out / "failures.csv"
    failures: dict[str, tuple[str, str, str]] = {}  # by molecule: a relabelled shard replaces its rows
    if failures_file.is_file():
        with failures_file.open() as fh:
            failures = {r[0]: tuple(r) for r in list(csv.reader(fh))[1:]}
    shards = [molecules[i : i + molecules_per_shard] for i in range(0, len(molecules), molecules_per_shard)]
    n_records = n_done = 0
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(molecules), unit="mol", desc="labelling")
    for k, chunk in enumerate(shards):
        path = out / f"shard-{k:05d}.extxyz"
        marker = out / f".shard-{k:05d}.empty"  # every molecule of the shard failed
        if path.is_file() or marker.is_file():  # finished before a restart
            if bar is not None:
                bar.update(len(chunk))
            continue
        records, failed = label_molecules(chunk, n_workers=n_workers, **settings)
        smiles = dict(chunk)
        # the failures first, then the shard that marks the chunk done: a kill between the two
        # relabels the chunk on restart instead of losing its failures
        failures.update((name, (name, smiles.get(name, ""), reason.replace("\n", " "))) for name, reason in failed)
        buffer = io.StringIO()
        w = csv.writer(buffer)
        w.writerow(["name", "smiles", "reason"])
        w.writerows(failures.values())
        atomic_write_text(failures_file, buffer.getvalue())
        if records:
            write_extxyz(path, records)
        else:
            marker.write_text("")
        n_records += len(records)
        n_done += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(records=n_records, failed=len(failures))
    if bar is not None:
        bar.close()
    report = {
        "n_molecules": len(molecules),
        "n_shards": len(shards),
        "n_failed": len(failures),
        "records_this_run": n_records,
        "molecules_this_run": n_done,
        "wall_time_s_this_run": round(time.time() - t0, 1),
    }
    atomic_write_text(out / "label_report.json", json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------------
# Molecular-property labels (HOMO, LUMO, gap, dipole) from a GFN2-xTB single point
# ----------------------------------------------------------------------------------------------

__all__ += ["PROPERTY_INFO_KEYS", "xtb_properties", "label_properties"]

#: The ``atoms.info`` keys every property record from :func:`label_properties` carries
#: (``smiles`` only when the input record knows it).
PROPERTY_INFO_KEYS = (
    "homo",
    "lumo",
    "gap",
    "mu",
    "dipole_x",
    "dipole_y",
    "dipole_z",
    "equilibrium",
    "mol_id",
    "smiles",
    "source",
    "level_of_theory",
    "charge",
)

# tblite's default electronic temperature, also what the TBLite ASE calculator (and so every
# energy/force label of this module) uses: properties and energies stay consistent.
_ELECTRONIC_TEMPERATURE_K = 300.0


def _structure_of(record: Any) -> tuple[np.ndarray, np.ndarray, int | None, str, dict[str, Any]]:
    """``(numbers, positions Å, charge or None, name, extra)`` of a Conformation or ase.Atoms.

    ``extra`` holds the metadata a property record carries over: ``smiles``, ``source``,
    ``equilibrium`` (only what the record actually has).
    """
    from .conformation import Conformation

    if isinstance(record, Conformation):
        extra: dict[str, Any] = {"equilibrium": bool(record.equilibrium)}
        if record.source:
            extra["source"] = str(record.source)
        if record.info.get("smiles"):
            extra["smiles"] = str(record.info["smiles"])
        name = record.mol_id or Atoms(numbers=record.z).get_chemical_formula()
        return np.asarray(record.z), np.asarray(record.pos, dtype=float), int(record.charge), str(name), extra
    if isinstance(record, Atoms):
        info = record.info
        extra = {}
        for key in ("smiles", "source"):
            if info.get(key):
                extra[key] = str(info[key])
        if "equilibrium" in info:
            extra["equilibrium"] = bool(info["equilibrium"])
        charge = info.get("charge")
        return (
            record.get_atomic_numbers(),
            record.get_positions(),
            None if charge is None else int(charge),
            _name_of(record),
            extra,
        )
    raise TypeError(f"expected a Conformation or an ase.Atoms, got {type(record).__name__}")


@_one_openmp_thread
def _xtb_properties_raw(
    numbers: np.ndarray, positions: np.ndarray, charge: int, accuracy: float, name: str
) -> dict[str, Any]:
    """The work of :func:`xtb_properties` on plain arrays (picklable inputs for workers)."""
    from ase.data import chemical_symbols

    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (len(numbers), 3) or len(numbers) == 0:
        raise DataError(
            f"molecule {name!r}: positions have shape {positions.shape} for {len(numbers)} atoms"
        )
    if not np.all(np.isfinite(positions)):
        raise DataError(f"molecule {name!r}: positions contain NaN or Inf")
    # All-electron parity decides open/closed shell (core electrons are paired, so the valence
    # electron count tblite occupies has the same parity).
    n_all = int(numbers.sum()) - int(charge)
    if n_all <= 0 or n_all % 2:
        raise DataError(
            f"molecule {name!r}: {n_all} electrons (charge {charge}) is an odd-electron / "
            "open-shell system; only closed-shell molecules get HOMO/LUMO labels"
        )
    bad = sorted({int(z) for z in numbers if not 1 <= z <= 86})
    if bad:
        symbols = [chemical_symbols[z] if 0 < z < len(chemical_symbols) else z for z in bad]
        raise DataError(
            f"molecule {name!r}: elements {symbols} are outside GFN2-xTB's parametrization (H-Rn)"
        )

    from tblite.interface import Calculator

    # Centre of mass at the origin: the dipole of an ion is then taken about its centre of mass
    # (for a neutral molecule the dipole does not depend on the origin; energies never do).
    masses = Atoms(numbers=numbers).get_masses()
    com = masses @ positions / masses.sum()
    try:
        calc = Calculator("GFN2-xTB", numbers, (positions - com) / units.Bohr, float(charge), 0)
        calc.set("verbosity", 0)
        calc.set("accuracy", float(accuracy))
        calc.set("temperature", _ELECTRONIC_TEMPERATURE_K * units.kB / units.Hartree)
        res = calc.singlepoint()
        eps = np.asarray(res.get("orbital-energies"), dtype=np.float64)  # Hartree
        occ = np.asarray(res.get("orbital-occupations"), dtype=np.float64)
        dip_au = np.asarray(res.get("dipole"), dtype=np.float64).reshape(-1)  # e·Bohr
        charges = np.asarray(res.get("charges"), dtype=np.float64).reshape(-1)  # e
        energy_ha = float(res.get("energy"))
    except RuntimeError as exc:  # SCF not converged, bad input, ...
        raise DataError(f"molecule {name!r}: GFN2-xTB single point failed: {exc}") from None

    if eps.ndim != 1 or occ.shape != eps.shape:
        raise DataError(
            f"molecule {name!r}: unexpected orbital data from tblite (energies {eps.shape}, "
            f"occupations {occ.shape}); expected one restricted set of orbitals"
        )
    n_el = float(occ.sum())
    n_val = int(round(n_el))
    if abs(n_el - n_val) > 1e-6 or n_val % 2:
        raise DataError(
            f"molecule {name!r}: orbital occupations sum to {n_el:.6f} electrons; not a "
            "closed-shell molecule"
        )
    i_homo = n_val // 2 - 1  # = ceil(N/2) - 1 for even N; orbitals come in ascending energy
    if i_homo < 0 or i_homo + 1 >= len(eps):
        raise DataError(
            f"molecule {name!r}: {n_val} valence electrons in {len(eps)} orbitals leave no "
            "HOMO/LUMO pair"
        )
    if not (occ[i_homo] > 1.5 and occ[i_homo + 1] < 0.5):
        # Frontier orbitals (near-)degenerate across the Fermi level: the smeared occupations
        # split an electron pair between them (O2 in a restricted calculation: 1.0 and 1.0).
        # At 300 K this bound refuses gaps below about 0.06 eV.
        # The molecule has open-shell character and HOMO/LUMO are not defined.
        raise DataError(
            f"molecule {name!r}: frontier orbitals share the electrons (HOMO occupation "
            f"{occ[i_homo]:.3f}, LUMO occupation {occ[i_homo + 1]:.3f}, orbital energies "
            f"{eps[i_homo] * units.Hartree:.4f} and {eps[i_homo + 1] * units.Hartree:.4f} eV); "
            "open-shell character (e.g. a triplet ground state), no closed-shell HOMO/LUMO"
        )
    homo = float(eps[i_homo] * units.Hartree)
    lumo = float(eps[i_homo + 1] * units.Hartree)
    dipole = dip_au * units.Bohr / units.Debye  # e·Bohr -> e·Å -> Debye
    out = {
        "homo": homo,
        "lumo": lumo,
        "gap": lumo - homo,
        "mu": float(np.linalg.norm(dipole)),
        "dipole": dipole,
        "energy": energy_ha * units.Hartree,
        "charges": charges,
        "n_electrons": n_val,
    }
    values = [homo, lumo, out["gap"], out["mu"], out["energy"], *dipole, *charges]
    if dipole.shape != (3,) or not np.all(np.isfinite(values)):
        raise DataError(
            f"molecule {name!r}: GFN2-xTB returned a non-finite or malformed result "
            f"(HOMO {homo}, LUMO {lumo}, dipole {dipole}, energy {out['energy']})"
        )
    return out


def xtb_properties(
    atoms_or_conformation: Any, charge: int | None = None, accuracy: float = 1.0
) -> dict[str, Any]:
    """GFN2-xTB (tblite) molecular properties of one closed-shell molecule, from one single point.

    Args:
        atoms_or_conformation: An :class:`ase.Atoms` or a
            :class:`~forcecentric.data.conformation.Conformation` (positions in Å).
        charge: Total charge in e; ``None`` takes the record's own (``Conformation.charge`` or
            ``atoms.info["charge"]``, else 0).
        accuracy: tblite accuracy (lower is tighter); 1.0 as for all labels of this module.

    Returns:
        A dict with ``homo``, ``lumo``, ``gap`` (= ``lumo - homo``) in eV; ``mu`` the dipole
        magnitude and ``dipole`` the dipole vector (``numpy`` array of 3 floats) in Debye;
        ``energy`` the total GFN2-xTB energy in eV; ``charges`` the Mulliken-type atomic partial
        charges in e; ``n_electrons`` the number of valence electrons tblite occupied.
        HOMO is orbital ``N/2 - 1`` (0-based, ascending energy) for ``N`` valence electrons
        (the occupations summed, 300 K Fermi smearing as for all labels here), LUMO the next
        one; HOMO must hold more than 1.5 electrons and LUMO less than 0.5, otherwise the
        frontier orbitals are (near-)degenerate across the Fermi level (gap below about
        0.06 eV, e.g. triplet O2 computed closed-shell) and the molecule is refused.
        The dipole is taken about the centre of mass (this matters for ions only).

    Raises:
        DataError: an odd-electron / open-shell molecule, an SCF failure, elements outside
        GFN2-xTB, or any non-finite result; the message names the molecule.
    """
    numbers, positions, own_charge, name, _ = _structure_of(atoms_or_conformation)
    if charge is None:
        charge = 0 if own_charge is None else own_charge
    return _xtb_properties_raw(numbers, positions, int(charge), float(accuracy), name)


def _properties_task(payload: tuple) -> tuple[dict[str, Any] | None, str | None]:
    """Worker entry point: never raises, returns (properties, error)."""
    numbers, positions, charge, accuracy, name = payload
    try:
        return _xtb_properties_raw(numbers, positions, charge, accuracy, name), None
    except Exception as exc:  # noqa: BLE001 - reported to the caller
        reason = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        return None, reason


def label_properties(
    records: Iterable[Any],
    workers: int = 2,
    *,
    charge: int | None = None,
    accuracy: float = 1.0,
    source: str | None = None,
    equilibrium: bool | None = None,
    failures: list[tuple[int, str, str]] | None = None,
    progress: bool = False,
    chunksize: int = 8,
) -> list[Atoms]:
    """GFN2-xTB property records (HOMO, LUMO, gap, dipole) for many molecules, in input order.

    Each record is a :class:`~forcecentric.data.conformation.Conformation` or an
    :class:`ase.Atoms`; :func:`xtb_properties` runs in ``workers`` ``spawn`` worker processes
    with one OpenMP thread each (in this process when ``workers <= 1``), so a calling script
    needs an ``if __name__ == "__main__":`` guard. The geometries are used as they are (meant
    for minima: the properties are those of the given structure, not re-optimized).

    Args:
        records: The molecules.
        workers: Number of worker processes.
        charge: Total charge for every record; ``None`` takes each record's own (default 0).
        accuracy: tblite accuracy.
        source: ``info["source"]`` of every output record; ``None`` keeps each record's source
            (``"forcecentric-xtb"`` when it has none).
        equilibrium: ``info["equilibrium"]`` of every output record; ``None`` keeps the flag of
            records that have one and sets ``True`` otherwise.
        failures: If a list, molecules that cannot be labelled are skipped and appended as
            ``(input index, mol_id, reason)``; if ``None`` the first failure (in input order)
            raises.
        progress: Show a tqdm progress bar.
        chunksize: Molecules sent to a worker at a time.

    Returns:
        New :class:`ase.Atoms` (positions as given) with ``info`` keys ``homo``, ``lumo``,
        ``gap`` (eV), ``mu`` (Debye), ``dipole_x``, ``dipole_y``, ``dipole_z`` (Debye),
        ``equilibrium``, ``mol_id``, ``smiles`` (when the record has one), ``source``,
        ``level_of_theory`` (``"GFN2-xTB"``) and ``charge``, and the total GFN2-xTB energy (eV)
        on a :class:`~ase.calculators.singlepoint.SinglePointCalculator` (no forces: these
        are property records). Write them with ``write_extxyz(path, records,
        require_forces=False)``.

    Raises:
        DataError: (with ``failures=None``) naming the record index and the molecule.
    """
    items = [_structure_of(r) for r in records]
    payloads = [
        (z, pos, int(charge if charge is not None else (0 if c is None else c)), float(accuracy), name)
        for z, pos, c, name, _ in items
    ]
    for i, (_, _, _, name, extra) in enumerate(items):  # fail now, not after the labelling
        strings = (("mol_id", name), ("smiles", extra.get("smiles")), ("source", source or extra.get("source")))
        for what, value in strings:
            problem = None if value is None else _extxyz_string_problem(value)
            if problem:
                raise DataError(f"molecule {name!r}: {what} {problem}", record=i)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(payloads), unit="mol", desc="xtb properties")
    results: list[tuple[dict[str, Any] | None, str | None]] = []
    try:
        if workers <= 1 or len(payloads) <= 1:
            for p in payloads:
                results.append(_properties_task(p))
                if bar is not None:
                    bar.update(1)
        else:
            try:
                with process_pool(min(workers, len(payloads)), initializer=_init_worker) as pool:
                    for res in pool.map(_properties_task, payloads, chunksize=max(1, int(chunksize))):
                        results.append(res)
                        if bar is not None:
                            bar.update(1)
            except cf.process.BrokenProcessPool as exc:
                raise RuntimeError(
                    f"a worker process died after {len(results)} of {len(payloads)} molecules "
                    "(out of memory, or a script without an `if __name__ == \"__main__\":` guard "
                    "/ read from stdin); rerun with workers=1 to see the error in this process"
                ) from exc
    finally:
        if bar is not None:
            bar.close()

    out: list[Atoms] = []
    for i, ((z, pos, _, name, extra), payload, (props, err)) in enumerate(
        zip(items, payloads, results)
    ):
        if err is not None:
            if failures is None:
                raise DataError(err if f"molecule {name!r}" in err else f"molecule {name!r}: {err}", record=i)
            logger.warning("no properties for record %d (%s): %s", i, name, err)
            failures.append((i, name, err))
            continue
        atoms = Atoms(numbers=z, positions=pos)
        dx, dy, dz = (float(v) for v in props["dipole"])
        info: dict[str, Any] = {
            "homo": props["homo"],
            "lumo": props["lumo"],
            "gap": props["gap"],
            "mu": props["mu"],
            "dipole_x": dx,
            "dipole_y": dy,
            "dipole_z": dz,
            "equilibrium": bool(equilibrium if equilibrium is not None else extra.get("equilibrium", True)),
            "mol_id": name,
        }
        if extra.get("smiles"):
            info["smiles"] = extra["smiles"]
        info["source"] = str(source or extra.get("source") or DEFAULT_SOURCE)
        info["level_of_theory"] = LEVEL_OF_THEORY
        info["charge"] = int(payload[2])
        atoms.info = info
        atoms.calc = SinglePointCalculator(atoms, energy=float(props["energy"]))
        out.append(atoms)
    return out
