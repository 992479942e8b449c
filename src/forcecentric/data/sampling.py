"""Samplers for distributed (multi-process) training and evaluation.

Under DDP every process (rank) runs its own DataLoader; each must see a different part of the
data and, for training, the same number of batches (else the gradient all-reduce of the rank
with the extra batch waits forever). :class:`DistributedShuffleSampler` does both without the
padding duplicates of ``torch.utils.data.DistributedSampler``:

* training (``shuffle=True, drop_last=True``): per epoch one permutation of all ``n``
  conformations, seeded by ``(seed, epoch)``; its last ``n % world_size`` entries are left out,
  and rank ``r`` takes ``perm[r::world_size]``. Every rank gets ``n // world_size`` items, no
  conformation is seen twice in an epoch, and the at most ``world_size - 1`` skipped ones are
  different ones each epoch (they are wherever the permutation put them).
* evaluation (``shuffle=False, drop_last=False``): rank ``r`` takes ``r, r + W, r + 2W, ...``;
  the shards are disjoint and cover every item once (sizes differ by at most one), so metrics
  reduced as weighted sums over ranks are exactly those of one process.

Weighted multi-source sampling is :class:`forcecentric.data.store.WeightedSourceSampler`, which
takes the same ``num_replicas`` / ``rank`` / ``drop_last`` arguments.

Both draw an epoch from ``(seed, epoch)`` alone, so an epoch can be drawn again after a crash;
:class:`ResumableSampler` then leaves out the part of it a killed run had trained on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import DataError


def _ints(indices: np.ndarray) -> Iterator[int]:
    """Python ints one at a time from an index array: an epoch of 15 M indices as a list would
    hold ~540 MB per process, the array holds 120 MB."""
    return map(int, indices)


class DistributedShuffleSampler(torch.utils.data.Sampler[int]):
    """Indices ``0..n-1`` split between ``num_replicas`` ranks without duplicates.

    Args:
        n: dataset length.
        num_replicas: number of ranks (the world size).
        rank: this process's global rank.
        seed: random seed; the order of an epoch depends only on ``(seed, epoch)``.
        shuffle: permute the indices each epoch (training) or keep their order (evaluation).
        drop_last: leave out the last ``n % num_replicas`` indices (of the permuted order), so
            every rank gets exactly ``n // num_replicas``; else ranks get ``floor`` or ``ceil``.
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, *,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        n, num_replicas, rank = int(n), int(num_replicas), int(rank)
        if num_replicas < 1:
            raise DataError(f"num_replicas must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise DataError(f"rank {rank} is not in 0..{num_replicas - 1}")
        if n < 0:
            raise DataError(f"dataset length must be >= 0, got {n}")
        self.n = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch: a new permutation per epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.num_replicas
        return len(range(self.rank, self.n, self.num_replicas))

    def order(self) -> np.ndarray:
        """The order of all ``n`` indices this epoch (before the remainder is left out)."""
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        if self.drop_last:
            order = order[: self.n - self.n % self.num_replicas]
        return _ints(order[self.rank :: self.num_replicas])


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A training sampler that can continue an interrupted epoch where it stopped.

    ``base`` must be epoch-deterministic: its order for an epoch depends only on its seed and
    the epoch (:class:`DistributedShuffleSampler`, ``WeightedSourceSampler``), so the epoch can
    be drawn again after a restart. :meth:`resume` makes the next pass over ``epoch`` leave out
    the first ``skip`` indices of this rank: the ones the killed run had already trained on.
    ``len()`` stays the full epoch's, as Lightning expects of a resumed loader (it counts the
    batches already done). Any other epoch, and every later pass, is the base order, unchanged.
    """

    def __init__(self, base: torch.utils.data.Sampler[int]) -> None:
        if not hasattr(base, "set_epoch"):
            raise TypeError(f"{type(base).__name__} has no set_epoch: its epochs cannot be replayed")
        self.base = base
        self._resume: tuple[int, int] | None = None

    @property
    def epoch(self) -> int:
        return int(self.base.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """Start at ``epoch``, leaving out its first ``skip`` indices (once)."""
        self.base.set_epoch(int(epoch))
        self._resume = (int(epoch), max(0, int(skip)))

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[int]:
        it = iter(self.base)
        pending, self._resume = self._resume, None
        if pending is not None and pending[0] == self.epoch and pending[1]:
            return itertools.islice(it, pending[1], None)
        return it


class NodeLocalSampler(torch.utils.data.Sampler[int]):
    """Training indices such that every node reads only its own shards of the stores.

    Shard ``s`` (numbered over the training stores, :func:`forcecentric.data.store.node_of_shard`)
    belongs to node ``s mod num_nodes``. Each epoch, node ``n`` permutes the conformations of its
    shards (seeded by ``(seed, epoch, n)``) and its ``local_world`` processes take every
    ``local_world``-th of them, as :class:`DistributedShuffleSampler` does for the whole set.
    DDP needs the same number of batches on every rank, so each rank takes
    ``min over nodes (node's conformations) // local_world``; the surplus of the larger nodes
    (at most about one shard per node when shards are of equal size) is left out of that epoch,
    a different part each epoch.

    Args:
        shard_of_item: the shard number of every training item.
        num_nodes, node: the number of nodes and this process's node.
        local_world, local_rank: processes per node and this process's rank on its node.
        seed: random seed.
    """

    def __init__(self, shard_of_item: np.ndarray, num_nodes: int, node: int, local_world: int = 1,
                 local_rank: int = 0, seed: int = 0) -> None:
        if not 0 <= node < num_nodes or not 0 <= local_rank < local_world:
            raise DataError(f"node {node} of {num_nodes} / local rank {local_rank} of {local_world} is out of range")
        owner = np.asarray(shard_of_item, dtype=np.int64) % int(num_nodes)
        counts = np.bincount(owner, minlength=num_nodes)
        if counts.min() < local_world:
            empty = [int(k) for k in np.flatnonzero(counts < local_world)]
            raise DataError(
                f"data.node_local_shards: node(s) {empty} would get fewer training conformations than their "
                f"{local_world} processes ({counts.tolist()} per node): the stores have too few shards for "
                f"{num_nodes} nodes; rebuild them with a smaller shard size, or turn node_local_shards off"
            )
        self.items = np.flatnonzero(owner == node).astype(np.int64)
        self.per_rank = int(counts.min()) // int(local_world)
        self.counts = counts
        self.local_world, self.local_rank = int(local_world), int(local_rank)
        self.node, self.seed = int(node), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed, self.epoch, self.node]).permutation(self.items.shape[0])
        mine = self.items[perm[: self.per_rank * self.local_world]][self.local_rank :: self.local_world]
        return _ints(mine)
