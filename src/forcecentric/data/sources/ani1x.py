"""Reader for the ANI-1x (and ANI-1ccx) HDF5 release, and the older ANI-1 layout.

ANI-1x release layout (``ani1x-release.h5``; Smith et al., Sci. Data 7, 134 (2020)): one group per
molecular formula (a group holds every conformer of every isomer with that formula), with

* ``atomic_numbers`` [n_atoms] and ``coordinates`` [n_conf, n_atoms, 3] in Angstrom;
* ``<level>.energy`` [n_conf] in Hartree and ``<level>.forces`` [n_conf, n_atoms, 3] in
  Hartree/Angstrom (forces, not gradients), for ``wb97x_dz`` (wB97X/6-31G(d)), ``wb97x_tz``
  (wB97X/def2-TZVPP); energy only for ``ccsd(t)_cbs`` (CCSD(T)*/CBS), ``hf_*``, and correlation
  energies ``*.corr_energy``; NaN where a conformer was not computed at that level.

ANI-1 layout (``ani_gdb_s0N.h5``; Smith et al., Sci. Data 4, 170193 (2017)): groups
``gdb11_s0N/gdb11_s0N-M`` (one per molecule) with ``coordinates`` (Angstrom), ``energies``
(Hartree, wB97X/6-31G(d)), ``species`` (element symbols as bytes) and ``smiles`` (characters as
bytes); no forces. A layout with ``energies`` / ``forces`` and integer ``species`` [n_conf, n_atoms]
(ANI-2x style) is read the same way.

All frames are off-equilibrium (normal-mode sampling and active learning). ``mol_id`` is the group
name (for ANI-1x this is a formula: isomers sharing it share the id, which keeps splits by molecule
conservative). ``info`` holds the group path, the conformer index and the energies at the other
levels present (eV).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..conformation import Conformation

log = logging.getLogger(__name__)

#: Level-of-theory names in ANI-1x dataset prefixes.
LEVELS = {
    "wb97x_dz": "wB97X/6-31G(d)",
    "wb97x_tz": "wB97X/def2-TZVPP",
    "ccsd(t)_cbs": "CCSD(T)*/CBS",
    "hf_dz": "HF/cc-pVDZ",
    "hf_tz": "HF/cc-pVTZ",
    "hf_qz": "HF/cc-pVQZ",
}
ANI1_LEVEL = "wB97X/6-31G(d)"


def molecule_groups(h5) -> Iterator:
    """Every group of an ANI-style file that holds a ``coordinates`` dataset (any depth)."""
    import h5py

    stack = [h5]
    while stack:
        group = stack.pop(0)
        for key in group:
            item = group.get(key, getclass=True)
            if item is h5py.Group:
                sub = group[key]
                if "coordinates" in sub:
                    yield sub
                else:
                    stack.append(sub)


def _decode_chars(arr) -> str:
    out = []
    for a in np.asarray(arr).reshape(-1):
        out.append(a.decode("ascii", "replace") if isinstance(a, bytes) else str(a))
    return "".join(out)


def read_ani1x(
    path: str | Path,
    *,
    level: str = "wb97x_dz",
    missing_forces: str = "keep",
    source: str | None = None,
    keep_other_energies: bool = True,
) -> Iterator[Conformation]:
    """Yield the conformers of an ANI-1x (or ANI-1) HDF5 file.

    Args:
        path: the ``.h5`` file.
        level: dataset prefix of the labels, ``wb97x_dz`` (default), ``wb97x_tz``, ``ccsd(t)_cbs``...
            Conformers whose energy at that level is NaN (not computed) are skipped.
        missing_forces: ``"keep"`` records whose forces are missing (NaN or no forces dataset at
            that level, e.g. ``ccsd(t)_cbs``) as energy-only records, or ``"drop"`` them.
        source: dataset name (default ``ANI-1x`` or ``ANI-1``).
        keep_other_energies: put the energies at the other levels of the group in ``info`` (eV).
    """
    import ase.units
    import h5py

    if missing_forces not in ("keep", "drop"):
        raise DataError(f"missing_forces must be 'keep' or 'drop', not {missing_forces!r}", file=str(path))
    file = str(path)
    hartree = ase.units.Hartree
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"cannot be opened as HDF5: {exc}", file=file) from exc
    record = 0
    skipped_energy = skipped_forces = 0
    with h5:
        for group in molecule_groups(h5):
            gname = group.name.lstrip("/")
            keys = set(group.keys())

            def fail(problem: str, at: int | None = None):
                raise DataError(f"group {gname!r}: {problem}", file=file, record=record if at is None else at)

            coords = np.asarray(group["coordinates"][()], dtype=np.float64)
            if coords.ndim != 3 or coords.shape[2] != 3:
                fail(f"coordinates have shape {coords.shape}, expected (n_conformers, n_atoms, 3)")
            n_conf, n_atoms = coords.shape[:2]
            if "atomic_numbers" in keys:  # ANI-1x
                layout = "ani1x"
                z = np.asarray(group["atomic_numbers"][()]).astype(np.int64).reshape(-1)
                ekey, fkey = f"{level}.energy", f"{level}.forces"
                lot = LEVELS.get(level, level)
                src = source or "ANI-1x"
            elif "species" in keys and "energies" in keys:  # ANI-1 / ANI-2x style
                layout = "ani1"
                species = np.asarray(group["species"][()])
                if species.dtype.kind in "SUO":
                    from ase.data import atomic_numbers

                    symbols = [s.decode("ascii") if isinstance(s, bytes) else str(s) for s in species.reshape(-1)]
                    unknown = [s for s in symbols if s not in atomic_numbers]
                    if unknown:
                        fail(f"unknown element symbols {sorted(set(unknown))}")
                    z = np.array([atomic_numbers[s] for s in symbols], dtype=np.int64)
                else:
                    z = species.astype(np.int64)
                ekey, fkey = "energies", "forces"
                lot = ANI1_LEVEL
                src = source or "ANI-1"
            else:
                fail(f"has coordinates but neither 'atomic_numbers' (ANI-1x) nor 'species'/'energies' "
                     f"(ANI-1); datasets: {sorted(keys)}")
            if z.ndim == 1 and z.shape[0] != n_atoms:
                fail(f"atomic_numbers have {z.shape[0]} atoms but coordinates have shape {coords.shape}")
            if z.ndim == 2 and z.shape != (n_conf, n_atoms):
                fail(f"species have shape {z.shape} but coordinates have shape {coords.shape}")
            if ekey not in keys:
                levels = sorted(k[: -len(".energy")] for k in keys if k.endswith(".energy"))
                fail(f"has no dataset {ekey!r}" + (f" (levels present: {levels})" if levels else ""))
            energy = np.asarray(group[ekey][()], dtype=np.float64).reshape(-1)
            if energy.shape[0] != n_conf:
                fail(f"{ekey} has {energy.shape[0]} values for {n_conf} conformers")
            forces = None
            if fkey in keys:
                forces = np.asarray(group[fkey][()], dtype=np.float64)
                if forces.shape != coords.shape:
                    fail(f"{fkey} have shape {forces.shape} but coordinates have shape {coords.shape}")
            others = {}
            if keep_other_energies and layout == "ani1x":
                for k in sorted(keys):
                    if (k.endswith(".energy") or k.endswith(".corr_energy")) and k != ekey:
                        v = np.asarray(group[k][()], dtype=np.float64).reshape(-1)
                        if v.shape[0] == n_conf:
                            others[k] = v
            smiles = _decode_chars(group["smiles"][()]) if layout == "ani1" and "smiles" in keys else ""
            for c in range(n_conf):
                if not np.isfinite(energy[c]):
                    skipped_energy += 1
                    continue
                f = None
                if forces is not None and np.all(np.isfinite(forces[c])):
                    f = forces[c] * hartree
                if f is None and missing_forces == "drop":
                    skipped_forces += 1
                    continue
                info = {"group": gname, "conformer": c}
                if smiles:
                    info["smiles"] = smiles
                for k, v in others.items():
                    if np.isfinite(v[c]):
                        info[k] = float(v[c] * hartree)
                yield Conformation(
                    z=z[c] if z.ndim == 2 else z, pos=coords[c], energy=energy[c] * hartree, forces=f,
                    equilibrium=False, source=src, level_of_theory=lot, mol_id=gname.split("/")[-1],
                    info=info,
                )
                record += 1
    if skipped_energy or skipped_forces:
        log.info("%s: skipped %d conformers without a %s energy and %d without forces",
                 file, skipped_energy, level, skipped_forces)
