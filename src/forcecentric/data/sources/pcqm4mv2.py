"""Reader for the PCQM4Mv2 3D structures (OGB-LSC ``pcqm4m-v2-train.sdf``), and a generic SDF parser.

``pcqm4m-v2-train.sdf`` holds one RDKit molblock per training molecule, in the order of the
PCQM4Mv2 training split, with 3D coordinates of the DFT (B3LYP/6-31G*) optimized geometry and no
energies or forces. Records are therefore ``equilibrium=True`` without labels; ``mol_id`` is the
molecule's index in the file (the PCQM4Mv2 index) unless ``mol_id="title"`` asks for the molblock
title. The file is parsed with ``sanitize=False, removeHs=False`` so every atom (hydrogens
included) is kept and valence problems do not lose molecules; a molblock RDKit cannot parse at all
raises a :class:`DataError` naming the file and record (or is skipped with a warning when
``errors="skip"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..conformation import Conformation

log = logging.getLogger(__name__)

LEVEL_OF_THEORY = "B3LYP/6-31G*"


def iter_sdf(path: str | Path, *, errors: str = "raise") -> Iterator[tuple[int, object]]:
    """Yield ``(index, rdkit Mol)`` for every molblock of an SDF file (unsanitized, Hs kept).

    ``index`` counts molblocks from 0, including any that are skipped. With ``errors="raise"`` a
    molblock RDKit cannot parse raises :class:`DataError`; with ``"skip"`` it is logged and skipped.
    """
    if errors not in ("raise", "skip"):
        raise DataError(f"errors must be 'raise' or 'skip', not {errors!r}", file=str(path))
    try:
        from rdkit import Chem, RDLogger
    except ImportError as exc:  # pragma: no cover - RDKit is a dependency
        raise DataError("reading SDF files needs RDKit", file=str(path)) from exc
    RDLogger.DisableLog("rdApp.*")
    file = str(path)
    try:
        if file.endswith(".gz"):
            import gzip

            handle = gzip.open(file, "rb")
            supplier = Chem.ForwardSDMolSupplier(handle, sanitize=False, removeHs=False)
        else:
            handle = open(file, "rb")
            supplier = Chem.ForwardSDMolSupplier(handle, sanitize=False, removeHs=False)
    except OSError as exc:
        raise DataError(f"cannot be opened: {exc}", file=file) from exc
    with handle:
        for i, mol in enumerate(supplier):
            if mol is None:
                if errors == "raise":
                    raise DataError("molblock cannot be parsed by RDKit (even without sanitization)",
                                    file=file, record=i)
                log.warning("%s: record %d: molblock cannot be parsed by RDKit; skipped", file, i)
                continue
            yield i, mol


def mol_arrays(mol, *, file: str, record: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Atomic numbers, positions (Angstrom) and total formal charge of an RDKit molecule."""
    if mol.GetNumConformers() == 0:
        raise DataError("molblock has no coordinates", file=file, record=record)
    conf = mol.GetConformer()
    if not conf.Is3D():
        pos = np.asarray(conf.GetPositions(), dtype=np.float64)
        if np.allclose(pos[:, 2], 0.0) and mol.GetNumAtoms() > 3:
            raise DataError("molblock has 2D coordinates (all z = 0), not a 3D structure", file=file, record=record)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    pos = np.asarray(conf.GetPositions(), dtype=np.float64).reshape(-1, 3)
    charge = int(sum(a.GetFormalCharge() for a in mol.GetAtoms()))
    return z, pos, charge


def read_pcqm4mv2(
    path: str | Path,
    *,
    errors: str = "raise",
    mol_id: str = "index",
    source: str | None = None,
    level_of_theory: str | None = None,
) -> Iterator[Conformation]:
    """Yield the equilibrium structures of a PCQM4Mv2 SDF file.

    Args:
        path: ``pcqm4m-v2-train.sdf`` (or ``.sdf.gz``).
        errors: ``"raise"`` on a molblock RDKit cannot parse, or ``"skip"`` it (logged).
        mol_id: ``"index"`` (the record's index in the file = PCQM4Mv2 index) or ``"title"``
            (the molblock's name line, falling back to the index when empty).
        source, level_of_theory: defaults ``PCQM4Mv2`` and B3LYP/6-31G*.
    """
    if mol_id not in ("index", "title"):
        raise DataError(f"mol_id must be 'index' or 'title', not {mol_id!r}", file=str(path))
    file = str(path)
    src = source or "PCQM4Mv2"
    lot = level_of_theory or LEVEL_OF_THEORY
    for i, mol in iter_sdf(path, errors=errors):
        z, pos, charge = mol_arrays(mol, file=file, record=i)
        title = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
        info = {"sdf_index": i}
        if title:
            info["title"] = title
        ident = title if (mol_id == "title" and title) else str(i)
        yield Conformation(
            z=z, pos=pos, energy=None, forces=None, charge=charge, equilibrium=True,
            source=src, level_of_theory=lot, mol_id=ident, info=info,
        )
