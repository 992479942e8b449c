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


def read(path: str | Path, format: str | None = None, *, validate: bool = True, **kwargs: Any) -> Iterator[Conformation]:
    """Yield the conformations stored in ``path``.

    ``format`` is an ASE format name (``extxyz``, ``xyz``, ``traj``, ``db``...) or None to let ASE
    guess it from the name and contents. Each record is validated (finite values, matching
    shapes, no two atoms closer than 0.1 Angstrom) and a :class:`DataError` names the file and the
    record index of the first bad one.
    """
    from .sources.ase_formats import read_ase

    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", file=str(path))
    for i, conf in enumerate(read_ase(path, format=format, **kwargs)):
        if validate:
            conf.validate(file=str(path), record=i)
        yield conf


def read_all(path: str | Path, format: str | None = None, **kwargs: Any) -> list[Conformation]:
    """Read every conformation of ``path`` into a list; an empty file is an error."""
    records = list(read(path, format=format, **kwargs))
    if not records:
        raise DataError("no conformations found (empty dataset)", file=str(path))
    return records
