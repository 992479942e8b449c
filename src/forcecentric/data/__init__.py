"""Data: the Conformation record, readers for public formats, datasets and batching.

``read(path, format=None)`` yields validated :class:`Conformation` records from any supported file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .conformation import Conformation

__all__ = ["Conformation", "read", "read_all"]


def _location(conf: Conformation) -> str:
    """Where a record sits inside its file, from the reader's ``info`` (group, member, molblock)."""
    info = conf.info
    if "group" in info:
        where = f"group {info['group']!r}"
        if "conformer" in info:
            where += f" conformer {info['conformer']}"
        return where
    if "member" in info:
        return f"member {info['member']!r}"
    if "sdf_index" in info:
        return f"molblock {info['sdf_index']}"
    return ""


def _ase_format_names() -> set[str]:
    try:
        from ase.io.formats import ioformats
    except ImportError:  # pragma: no cover
        return set()
    return set(ioformats)


def _check_options(reader, name: str, path: Path, kwargs: dict[str, Any]) -> None:
    """A clear error for an option the chosen reader does not take."""
    import inspect

    params = inspect.signature(reader).parameters
    accepted = [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = [k for k in kwargs if k not in params or k == "path"]
    if unknown:
        raise DataError(f"the {name!r} reader does not take option(s) {unknown}; it takes {accepted}",
                        file=str(path))


def read(path: str | Path, format: str | None = None, *, validate: bool = True, **kwargs: Any) -> Iterator[Conformation]:
    """Yield the conformations stored in ``path``.

    ``format`` is a reader name from :data:`forcecentric.data.sources.READERS` (``md17``,
    ``rmd17``, ``md22``, ``ani1x``, ``spice``, ``pcqm4mv2``, ``qm9``, ``ase``), an ASE format name
    (``extxyz``, ``xyz``, ``traj``, ``db``...: read by the ASE reader), or None to guess it from the
    name and contents (:func:`~forcecentric.data.sources.guess_format`). ``kwargs`` go to the
    reader (e.g. ``level="wb97x_tz"`` for ANI-1x, ``energy_key=`` / ``energy_unit=`` for ASE).

    Each record is validated (finite values, matching shapes, no two atoms closer than 0.1
    Angstrom) unless ``validate=False``; a :class:`DataError` names the file, the record index
    (counting the records this call yields) and, for HDF5 / archives / SDF, the group and
    conformer, member or molblock.
    """
    from .sources import READERS, guess_format, read_ase

    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", file=str(path))
    if format is None:
        format = guess_format(path)
    key = format.lower()
    if key in READERS:
        reader = READERS[key]
        _check_options(reader, key, path, kwargs)
        records = reader(path, **kwargs)
    elif format in _ase_format_names():
        records = read_ase(path, format=format, **kwargs)
    else:
        raise DataError(
            f"unknown format {format!r}; valid names: {sorted(READERS)} or an ASE format name",
            file=str(path),
        )
    for i, conf in enumerate(records):
        if validate:
            try:
                conf.validate(file=str(path), record=i)
            except DataError as exc:
                where = _location(conf)
                if not where:
                    raise
                raise DataError(f"{where}: {exc.problem}", file=str(path), record=i) from None
        yield conf


def read_all(path: str | Path, format: str | None = None, **kwargs: Any) -> list[Conformation]:
    """Read every conformation of ``path`` into a list; an empty file is an error."""
    records = list(read(path, format=format, **kwargs))
    if not records:
        raise DataError("no conformations found (empty dataset)", file=str(path))
    return records
