"""Train / validation / test splits: random over conformations, or by molecule identity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError


def _resolve_sizes(n: int, sizes: Sequence[float | int | None]) -> list[int]:
    """Turn fractions (<= 1.0 floats), counts (ints) and at most one None (the rest) into counts."""
    counts: list[int | None] = []
    for s in sizes:
        if s is None:
            counts.append(None)
        elif isinstance(s, float) and s <= 1.0:
            counts.append(int(round(s * n)))
        else:
            counts.append(int(s))
    if counts.count(None) > 1:
        raise DataError("at most one split size may be left open (None)")
    fixed = sum(c for c in counts if c is not None)
    if fixed > n:
        raise DataError(
            f"split sizes {list(sizes)} ask for {fixed} items but only {n} exist "
            "(set data.n_train, data.n_val and data.n_test to fit the data)"
        )
    return [n - fixed if c is None else c for c in counts]


def random_split(n: int, sizes: Sequence[float | int | None], seed: int = 0) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes."""
    counts = _resolve_sizes(n, sizes)
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for c in counts:
        out.append(np.sort(perm[start : start + c]))
        start += c
    return out


def molecule_split(
    mol_ids: Sequence[str], sizes: Sequence[float | int | None], seed: int = 0
) -> list[np.ndarray]:
    """Split conformation indices so that no molecule appears in two parts.

    ``sizes`` count molecules (or fractions of molecules), not conformations.
    """
    # vectorised (a 15 M-conformation corpus in seconds): molecule codes in sorted-id order, so
    # the split is the same as drawing from sorted(set(mol_ids))
    ids = np.asarray(mol_ids, dtype=object)
    unique, codes = np.unique(ids, return_inverse=True)
    parts = random_split(len(unique), sizes, seed)
    part_of = np.empty(len(unique), dtype=np.int64)
    for k, idx in enumerate(parts):
        part_of[idx] = k
    of_record = part_of[codes.reshape(-1)]
    return [np.flatnonzero(of_record == k) for k in range(len(parts))]
