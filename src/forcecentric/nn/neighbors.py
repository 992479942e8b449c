"""Radius graph (neighbour list) for batches of molecules.

The graph is a *full* list (both ``i -> j`` and ``j -> i``), without self loops, with pairs only
inside the same molecule and **no cap on the number of neighbours**: every pair closer than the
cutoff is returned.

Two back-ends, chosen per molecule by size:

* small molecules are handled all at once by a padded, dense distance computation in torch on the
  input device (fast for the usual batches of many small molecules);
* large molecules go one by one through ``vesin_torch.NeighborList`` (cell lists, linear cost),
  computed on CPU and moved back to the input device.

The neighbour list itself is not differentiable (it is a set of integer pairs); callers recompute
edge vectors from ``pos`` so that forces flow through autograd.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["radius_graph", "VerletList", "DENSE_MAX_ATOMS_CPU", "DENSE_MAX_ATOMS_CUDA"]

#: Molecules with at most this many atoms use the dense back-end on CPU tensors.
DENSE_MAX_ATOMS_CPU = 64
#: Same threshold for tensors on an accelerator (dense work is cheap there, host copies are not).
DENSE_MAX_ATOMS_CUDA = 512
# upper bound on the number of (padded) pairs handled by one dense chunk
_DENSE_CHUNK_PAIRS = 1 << 21


# below this size vesin runs single-threaded (thread start-up costs more than it saves)
_VESIN_SINGLE_THREAD_MAX_ATOMS = 20_000


@lru_cache(maxsize=16)
def _vesin_calculator(cutoff: float, n_threads: int):
    import vesin_torch

    return vesin_torch.NeighborList(cutoff=cutoff, full_list=True, n_threads=n_threads)


def _empty(device: torch.device) -> Tensor:
    return torch.empty(2, 0, dtype=torch.long, device=device)


def _dense_pairs(
    pos_sorted: Tensor,
    mol_sorted: Tensor,
    local: Tensor,
    order: Tensor,
    mol_ids: Tensor,
    max_atoms: int,
    cutoff: float,
    n_mols_total: int,
) -> list[Tensor]:
    """All pairs within ``cutoff`` for the molecules ``mol_ids`` via padded dense distances."""
    device = pos_sorted.device
    # compact index of each selected molecule
    compact = torch.full((n_mols_total,), -1, dtype=torch.long, device=device)
    compact[mol_ids] = torch.arange(mol_ids.numel(), device=device)
    cid = compact[mol_sorted]
    sel = cid >= 0
    cid, loc = cid[sel], local[sel]
    n_sel = mol_ids.numel()
    # padding is NaN, and NaN < c^2 is False: padded slots never produce pairs
    padded = torch.full((n_sel, max_atoms, 3), float("nan"), dtype=pos_sorted.dtype, device=device)
    padded[cid, loc] = pos_sorted[sel]
    gidx = torch.full((n_sel, max_atoms), -1, dtype=torch.long, device=device)
    gidx[cid, loc] = order[sel]
    not_self = ~torch.eye(max_atoms, dtype=torch.bool, device=device)
    cut2 = cutoff * cutoff
    chunk = max(1, _DENSE_CHUNK_PAIRS // (max_atoms * max_atoms))
    out: list[Tensor] = []
    for start in range(0, n_sel, chunk):
        p = padded[start : start + chunk]
        diff = p.unsqueeze(2) - p.unsqueeze(1)
        d2 = (diff * diff).sum(-1)
        mask = (d2 < cut2) & not_self
        b, a, c = mask.nonzero(as_tuple=True)
        b = b + start
        out.append(torch.stack([gidx[b, a], gidx[b, c]]))
    return out


def radius_graph(
    pos: Tensor,
    batch: Tensor | None,
    cutoff: float,
    dense_max_atoms: int | None = None,
) -> Tensor:
    """Full neighbour list of all atom pairs closer than ``cutoff`` within the same molecule.

    Args:
        pos: ``[N, 3]`` positions (float32 or float64, any device).
        batch: ``[N]`` molecule index of every atom (need not be sorted); ``None`` means one
            molecule.
        cutoff: radius (same unit as ``pos``); pairs with distance ``< cutoff`` are returned.
        dense_max_atoms: molecules with at most this many atoms use the dense back-end, larger
            ones vesin; ``None`` picks a device-dependent default.

    Returns:
        ``LongTensor [2, E]`` on ``pos.device``: ``edge_index[0]`` is the centre atom ``i``,
        ``edge_index[1]`` its neighbour ``j``. Both directions are present, there are no self
        loops and no neighbour cap. Edges are grouped by molecule; their order is otherwise
        unspecified.
    """
    if pos.dim() != 2 or pos.shape[-1] != 3:
        raise ValueError(f"pos must have shape [N, 3], got {tuple(pos.shape)}")
    device = pos.device
    n_atoms = pos.shape[0]
    if n_atoms == 0:
        return _empty(device)
    pos = pos.detach()
    if batch is None:
        batch = torch.zeros(n_atoms, dtype=torch.long, device=device)
    batch = batch.to(device=device, dtype=torch.long)
    if batch.shape != (n_atoms,):
        raise ValueError(f"batch must have shape [{n_atoms}], got {tuple(batch.shape)}")
    if dense_max_atoms is None:
        dense_max_atoms = DENSE_MAX_ATOMS_CPU if device.type == "cpu" else DENSE_MAX_ATOMS_CUDA
    cutoff = float(cutoff)

    counts = torch.bincount(batch)
    n_mols = counts.numel()
    if n_mols == 1:
        order = torch.arange(n_atoms, device=device)
        mol_sorted = batch
        pos_sorted = pos
    else:
        order = torch.argsort(batch, stable=True)
        mol_sorted = batch[order]
        pos_sorted = pos[order]
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(n_atoms, device=device) - starts[mol_sorted]

    counts_cpu = counts.cpu()
    starts_cpu = starts.cpu()
    is_small = (counts_cpu >= 2) & (counts_cpu <= dense_max_atoms)
    is_large = counts_cpu > dense_max_atoms

    pieces: list[Tensor] = []
    if bool(is_small.any()):
        small_ids = torch.nonzero(is_small).flatten()
        max_atoms = int(counts_cpu[small_ids].max())
        pieces += _dense_pairs(
            pos_sorted, mol_sorted, local, order, small_ids.to(device), max_atoms, cutoff, n_mols
        )
    if bool(is_large.any()):
        pos_cpu = pos_sorted.cpu()
        box = torch.zeros(3, 3, dtype=pos_cpu.dtype)
        order_cpu = order.cpu()
        for m in torch.nonzero(is_large).flatten().tolist():
            s, n = int(starts_cpu[m]), int(counts_cpu[m])
            calc = _vesin_calculator(cutoff, 1 if n <= _VESIN_SINGLE_THREAD_MAX_ATOMS else 0)
            i, j = calc.compute(
                points=pos_cpu[s : s + n].contiguous(), box=box, periodic=False, quantities="ij"
            )
            idx = order_cpu[s : s + n]
            pieces.append(torch.stack([idx[i.long()], idx[j.long()]]).to(device))
    if not pieces:
        return _empty(device)
    return torch.cat(pieces, dim=1)


class VerletList:
    """A neighbour list reused across MD steps (Verlet list with a skin).

    The candidate pairs are built once with ``cutoff + skin``; each call keeps those closer than
    ``cutoff`` at the current positions, which costs one distance per candidate pair instead of a
    new search. The list is rebuilt when an atom has moved more than ``skin / 2`` since the last
    build (then no pair can have entered the cutoff sphere unseen), or when the atoms or molecules
    change. The result is the same set of pairs as :func:`radius_graph` with ``cutoff``; only the
    order of the edges may differ.

    ``skin = 0`` rebuilds at every call (the plain path). ``n_builds`` and ``n_calls`` count the
    searches and the calls.
    """

    def __init__(self, cutoff: float, skin: float = 0.5) -> None:
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.n_builds = 0
        self.n_calls = 0
        self._ref_pos: Tensor | None = None
        self._ref_batch: Tensor | None = None
        self._candidates: Tensor | None = None

    def reset(self) -> None:
        """Forget the list: the next call searches again."""
        self._ref_pos = self._ref_batch = self._candidates = None

    def _stale(self, pos: Tensor, batch: Tensor | None) -> bool:
        ref = self._ref_pos
        if ref is None or self.skin == 0.0 or ref.shape != pos.shape or ref.device != pos.device:
            return True
        if (batch is None) != (self._ref_batch is None):
            return True
        if batch is not None and not torch.equal(batch, self._ref_batch):
            return True
        moved2 = ((pos - ref) ** 2).sum(-1).max()
        return bool(moved2 > (0.5 * self.skin) ** 2)

    def __call__(self, pos: Tensor, batch: Tensor | None = None) -> Tensor:
        """``edge_index [2, E]`` of the pairs closer than ``cutoff`` (see :func:`radius_graph`)."""
        pos = pos.detach()
        self.n_calls += 1
        if self._stale(pos, batch):
            self._candidates = radius_graph(pos, batch, self.cutoff + self.skin)
            self._ref_pos = pos.clone()
            self._ref_batch = None if batch is None else batch.clone()
            self.n_builds += 1
            if self.skin == 0.0:
                return self._candidates
        i, j = self._candidates
        d = pos.index_select(0, j) - pos.index_select(0, i)
        keep = (d * d).sum(-1) < self.cutoff * self.cutoff
        return self._candidates[:, keep]
