"""One reader per public data format, a registry of them, and format detection.

Every reader is a generator ``read_X(path, **options) -> Iterator[Conformation]`` that converts
to eV, Angstrom and e (constants from :mod:`ase.units`) and sets ``equilibrium``, ``source``,
``level_of_theory`` and ``mol_id``. Validation is done by :func:`forcecentric.data.read`.

=========  =====================================================================================
name       reader
=========  =====================================================================================
md17       :func:`~.md17.read_md17`: original MD17 / MD22 / sGDML ``.npz``, MD17 plain ``.xyz``,
           schnetpack MD17 ``.db`` (kcal/mol)
rmd17      the same function (revised-MD17 ``.npz`` keys)
md22       the same function (MD22 ``.npz``)
ani1x      :func:`~.ani1x.read_ani1x`: ANI-1x / ANI-1ccx HDF5 release, older ANI-1 HDF5
spice      :func:`~.spice.read_spice`: SPICE HDF5 (Bohr, Hartree, gradients)
pcqm4mv2   :func:`~.pcqm4mv2.read_pcqm4mv2`: PCQM4Mv2 3D SDF (equilibrium, no labels)
qm9        :func:`~.qm9.read_qm9`: QM9 xyz files / directory / tar, ``gdb9.sdf`` + CSV, extxyz
           with properties in info, schnetpack QM9 ``.db``
ase        :func:`~.ase_formats.read_ase`: anything ASE reads (extxyz, xyz, traj, db, ...)
=========  =====================================================================================
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ...errors import DataError
from ..conformation import Conformation
from .ani1x import read_ani1x
from .ase_formats import read_ase
from .md17 import is_md17_xyz_header, npz_layout, read_md17
from .pcqm4mv2 import read_pcqm4mv2
from .qm9 import is_qm9_xyz_header, read_qm9
from .spice import read_spice

__all__ = ["READERS", "guess_format", "read_ani1x", "read_ase", "read_md17", "read_pcqm4mv2",
           "read_qm9", "read_spice"]

READERS: dict[str, Callable[..., Iterator[Conformation]]] = {
    "md17": read_md17,
    "rmd17": read_md17,
    "md22": read_md17,
    "ani1x": read_ani1x,
    "spice": read_spice,
    "pcqm4mv2": read_pcqm4mv2,
    "qm9": read_qm9,
    "ase": read_ase,
}

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _cannot_tell(path: Path, why: str) -> DataError:
    return DataError(
        f"cannot tell the data format ({why}); pass format= one of {sorted(READERS)} "
        "or an ASE format name",
        file=str(path),
    )


def _head(path: Path, n: int = 3) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [fh.readline() for _ in range(n)]
    except OSError:
        return []


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == _HDF5_MAGIC
    except OSError:
        return False


def _guess_npz(path: Path) -> str:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            name = ""
            if "name" in keys:
                try:
                    name = str(data["name"].reshape(-1)[0]) if data["name"].size else ""
                except Exception:
                    name = ""
    except Exception as exc:
        raise _cannot_tell(path, f"not a readable npz archive: {exc}") from exc
    layout = npz_layout(keys)
    if layout is None:
        raise _cannot_tell(path, f"npz keys {sorted(keys)} match neither MD17/MD22 (z, R, E, F) "
                                 "nor rMD17 (nuclear_charges, coords, energies, forces)")
    if layout == "md17":
        from .md17 import MD22_MOLECULES

        if path.stem.lower().startswith("md22") or name in MD22_MOLECULES:
            return "md22"
    return layout


def _guess_hdf5(path: Path) -> str:
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise _cannot_tell(path, f"not a readable HDF5 file: {exc}") from exc
    with h5:
        top = list(h5.keys())
        # look at up to two levels for a group holding the datasets
        frontier = [h5]
        for _depth in range(2):
            nxt = []
            for parent in frontier:
                for key in list(parent.keys())[:5]:
                    item = parent[key]
                    if not isinstance(item, h5py.Group):
                        continue
                    names = set(item.keys())
                    if "conformations" in names and "dft_total_energy" in names:
                        return "spice"
                    if "coordinates" in names and (
                        "atomic_numbers" in names or "species" in names
                    ):
                        return "ani1x"
                    nxt.append(item)
            frontier = nxt
    raise _cannot_tell(path, f"HDF5 groups {top[:5]} have neither the SPICE (conformations, "
                             "dft_total_energy) nor the ANI (coordinates, atomic_numbers) datasets")


def _guess_sdf(path: Path) -> str:
    name = path.name.lower()
    if "pcqm4m" in name:
        return "pcqm4mv2"
    if Path(str(path) + ".csv").exists() or "gdb9" in name or "qm9" in name:
        return "qm9"
    title = _head(path, 1)
    if title and title[0].strip().startswith("gdb_"):
        return "qm9"
    raise _cannot_tell(path, "an SDF file that is neither QM9 (gdb_N titles or a .csv beside it) "
                             "nor named like PCQM4Mv2; pass format='pcqm4mv2' to read any 3D SDF "
                             "as equilibrium structures")


def _guess_db(path: Path) -> str:
    try:
        import ase.db

        db = ase.db.connect(str(path), type="db")
        row = next(iter(db.select(limit=1)), None)
    except Exception:
        return "ase"
    if row is None:
        return "ase"
    data_keys = set(row.data.keys())
    if "energy_U0" in data_keys | set(row.key_value_pairs.keys()):
        return "qm9"
    if {"energy", "forces"} <= data_keys:
        return "md17"  # schnetpack MD17 layout (units from the metadata, else kcal/mol)
    if row.get("calculator") is None and data_keys & {"energy", "forces", "total_energy", "atomic_forces"}:
        raise _cannot_tell(path, f"an ASE database whose labels are in row.data ({sorted(data_keys)}) "
                                 "with no recorded units; format='ase' reads its structures without labels")
    return "ase"


def guess_format(path: str | Path) -> str:
    """Name in :data:`READERS` of the reader for ``path``, from its name and contents.

    Raises :class:`DataError` naming the file when the format cannot be told.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", file=str(path))
    name = path.name.lower()
    if path.is_dir():
        xyz = sorted(p for p in path.iterdir() if p.suffix == ".xyz")
        if xyz and is_qm9_xyz_header(_head(xyz[0])):
            return "qm9"
        raise _cannot_tell(path, "a directory that holds no QM9 .xyz files")
    if name.endswith(".npz"):
        return _guess_npz(path)
    if name.endswith((".h5", ".hdf5", ".hdf")) or _is_hdf5(path):
        return _guess_hdf5(path)
    if name.endswith((".sdf", ".sdf.gz")):
        return _guess_sdf(path)
    if name.endswith(_TAR_SUFFIXES):
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if member.isfile():
                        break
                else:
                    member = None
                if member is not None and member.name.endswith(".xyz"):
                    handle = tar.extractfile(member)
                    text = handle.read(4096).decode("utf-8", "replace") if handle else ""
                    if is_qm9_xyz_header(text.splitlines()[:3]):
                        return "qm9"
        except (tarfile.TarError, OSError) as exc:
            raise _cannot_tell(path, f"unreadable tar archive: {exc}") from exc
        raise _cannot_tell(path, "a tar archive that does not hold QM9 .xyz files")
    if name.endswith(".db"):
        return _guess_db(path)
    if name.endswith((".xyz", ".extxyz")):
        head = _head(path)
        if is_qm9_xyz_header(head):
            return "qm9"
        if is_md17_xyz_header(head):
            return "md17"
        comment = head[1] if len(head) > 1 else ""
        if "U0=" in comment and ("epsHOMO=" in comment or "homo=" in comment or "gap=" in comment):
            return "qm9"
        return "ase"
    # anything else: ASE, if it can tell the format
    try:
        from ase.io.formats import filetype, ioformats

        fmt = filetype(str(path), read=True)
    except Exception as exc:
        raise _cannot_tell(path, f"unknown extension and ASE cannot tell either: {exc}") from exc
    if fmt not in ioformats or not ioformats[fmt].can_read:
        raise _cannot_tell(path, f"unknown extension and ASE has no reader for {fmt!r}")
    return "ase"
