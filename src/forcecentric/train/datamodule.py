"""Lightning data module: reads the configured files, validates them and splits them."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ..config import DataConfig
from ..data import read_all
from ..data.conformation import Conformation
from ..data.dataset import ConformationDataset, PropertyCollate, collate, property_values
from ..data.sampling import DistributedShuffleSampler, NodeLocalSampler, ResumableSampler
from ..data.splits import molecule_split, random_split
from ..errors import ConfigError, DataError

log = logging.getLogger("forcecentric")

BUNDLED_PREFIX = "bundled:"


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bundled"


def resolve_path(spec: str) -> Path:
    """``bundled:NAME`` names a dataset shipped with the package; anything else is a path."""
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX):]
        if (bundled_dir() / name).exists():
            return bundled_dir() / name
        candidates = sorted(bundled_dir().glob(name + ".*"))
        if not candidates:
            known = sorted({p.stem for p in bundled_dir().iterdir() if p.suffix in (".extxyz", "")})
            raise DataError(f"no bundled dataset {name!r}; bundled datasets: {known}")
        return candidates[0]
    return Path(spec)


def load_records(specs: list[str], format: str | None = None, max_force: float | None = None) -> list[Conformation]:
    """Read and validate every file in ``specs``; raise on the first bad record or empty input."""
    records: list[Conformation] = []
    for spec in specs:
        path = resolve_path(spec)
        for i, conf in enumerate(read_all(path, format=format)):
            if max_force is not None:
                conf.validate(file=str(path), record=i, max_force=max_force)
            records.append(conf)
    return records


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def open_source(spec: str, format: str | None = None, max_force: float | None = None,
                skip_bad_shards: bool = False):
    """A store directory opens lazily as a :class:`~forcecentric.data.store.Store` (leaving out
    unreadable shards with ``skip_bad_shards``); any other file is read, validated and held in
    memory as a :class:`ConformationDataset`."""
    path = resolve_path(spec)
    if is_store(path):
        from ..data.store import Store

        return Store(path, skip_bad_shards=skip_bad_shards)
    return ConformationDataset(load_records([spec], format, max_force), name=str(path))


def _concat(parts: list) -> torch.utils.data.Dataset:
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _shard_keys(ds) -> np.ndarray:
    """Shard number of every item, numbered over the stores of ``data.train`` in their order
    (``data.node_local_shards``); a data file read into memory is not sharded (ConfigError)."""
    if isinstance(ds, torch.utils.data.Subset):
        return _shard_keys(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, torch.utils.data.ConcatDataset):
        keys, offset = [], 0
        for part in ds.datasets:
            keys.append(_shard_keys(part).astype(np.int64) + offset)
            offset += len(part.manifest["shards"])
        return np.concatenate(keys)
    if isinstance(ds, ConformationDataset):
        raise ConfigError(f"data.node_local_shards needs stores (forcecentric build-data); {ds.name!r} is a "
                          "data file, read whole by every process")
    return ds.shard_numbers().astype(np.int64)


def _equilibrium_flags(parts: list) -> np.ndarray:
    flags = []
    for ds in parts:
        if isinstance(ds, ConformationDataset):
            flags.append(np.array([bool(r.equilibrium) for r in ds.records], dtype=bool))
        else:
            flags.append(np.asarray(ds.equilibrium_flags(), dtype=bool))
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def equilibrium_only_molecules(mol_ids, fraction: float) -> set[str]:
    """The molecules that keep only their minima: a stable pick by a hash of the molecule id
    (the same molecules for every seed, run and machine)."""
    import zlib

    return {m for m in set(mol_ids) if zlib.crc32(m.encode()) / 2**32 < fraction}


def _mol_ids(parts: list) -> np.ndarray:
    """Molecule id of every record of the parts, as one object array (str objects shared)."""
    ids = []
    for ds in parts:
        if isinstance(ds, ConformationDataset):
            ids.append(np.array([r.mol_id for r in ds.records], dtype=object))
        else:
            ids.append(np.asarray(ds.mol_ids(), dtype=object))
    return np.concatenate(ids) if ids else np.zeros(0, dtype=object)


def sample_records(ds: torch.utils.data.Dataset, limit: int, seed: int = 0) -> list[Conformation]:
    """All records of ``ds``, or ``limit`` of them drawn at random (for statistics and fits)."""
    n = len(ds)
    idx = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    return [ds[int(i)] for i in idx]


def describe_dataset(ds: torch.utils.data.Dataset, name: str, limit: int = 20_000) -> dict:
    """Counts of a (sub)dataset; above ``limit`` conformations they are estimated from a sample."""
    if isinstance(ds, ConformationDataset):
        out = ds.describe()
        out["name"] = name
        return out
    recs = sample_records(ds, limit)
    out = ConformationDataset(recs, name=name).describe()
    if len(recs) < len(ds):
        scale = len(ds) / len(recs)
        for key in ("n_equilibrium", "n_off_equilibrium", "n_with_forces", "n_with_energy"):
            out[key] = int(round(out[key] * scale))
        out["estimated_from_sample"] = len(recs)
    out["n_conformations"] = len(ds)
    return out


def dataset_elements(ds: torch.utils.data.Dataset) -> list[int]:
    if isinstance(ds, ConformationDataset):
        return ds.elements()
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_elements(ds.dataset)
    if isinstance(ds, torch.utils.data.ConcatDataset):
        return sorted({z for part in ds.datasets for z in dataset_elements(part)})
    return list(ds.elements())


class ForceFieldDataModule(pl.LightningDataModule):
    """Train / val / test datasets from a :class:`DataConfig`.

    ``data.train`` may list data files (read into memory) and store directories (read lazily,
    per DataLoader worker). When no separate val / test files are given they are carved out of
    the training data, at random or by molecule identity, reproducibly from ``seed``; val and
    test are drawn first, so they do not change with ``n_train``.

    The training order of an epoch depends only on ``(seed, epoch)`` (:meth:`_sampler`), so a
    run killed in the middle of an epoch resumes it where its last checkpoint stood
    (:meth:`state_dict`). Under DDP (the attached Trainer's ``world_size > 1``) each rank gets
    its own share of that order without repeats (the at most ``world_size - 1`` left over are
    skipped that epoch), weighted by source when ``source_weights`` is set, and disjoint
    validation / test shards. See docs/distributed.md.
    """

    def __init__(self, config: DataConfig, seed: int = 0, properties: list[str] | None = None):
        super().__init__()
        self.config = config
        self.seed = seed
        #: molecular properties every record must carry (property task): batches are (Batch, y)
        self.properties = list(properties) if properties else None
        self.collate_fn = PropertyCollate(self.properties) if self.properties else collate
        self.train_set = None
        self.val_set = None
        self.test_set = None
        self.hidden_molecules = 0
        self._resume_from: dict | None = None  # datamodule state of the checkpoint resumed from

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.config
        if not c.train:
            raise DataError("data.train lists no files: nothing to train on")
        parts = [open_source(s, c.format, c.max_force, c.skip_bad_shards) for s in c.train]
        val_parts = [open_source(s, c.format, c.max_force, c.skip_bad_shards) for s in c.val]
        test_parts = [open_source(s, c.format, c.max_force, c.skip_bad_shards) for s in c.test]
        if self.properties:
            for spec, ds in zip(c.train + c.val + c.test, parts + val_parts + test_parts):
                self._check_properties(spec, ds)
        pool = _concat(parts)
        val = _concat(val_parts) if c.val else None
        test = _concat(test_parts) if c.test else None
        if test is None and c.n_test is None and c.n_train is None:
            raise ConfigError("data.n_test: null (the rest) needs data.n_train (a count or fraction)")
        sizes = [0 if val is not None else c.n_val, 0 if test is not None else c.n_test, c.n_train]
        if c.n_train is not None and sizes[1] is not None:
            sizes.append(None)
        if c.split_by_molecule:
            split = molecule_split(_mol_ids(parts), sizes, self.seed)
        else:
            split = random_split(len(pool), sizes, self.seed)
        va, te, tr = split[0], split[1], split[2]
        if c.equilibrium_only_molecules:
            ids = _mol_ids(parts)
            hidden = equilibrium_only_molecules(ids[tr], c.equilibrium_only_molecules)
            eq = _equilibrium_flags(parts)
            tr = tr[eq[tr] | ~np.isin(ids[tr], np.array(sorted(hidden), dtype=object))]
            self.hidden_molecules = len(hidden)
        # indices as numpy arrays, not lists: 8 bytes per conformation instead of ~36 (a list of
        # Python ints), in every process and DataLoader worker: 120 MB, not 540 MB, for 15 M
        Subset = torch.utils.data.Subset
        self.train_set = Subset(pool, np.asarray(tr, dtype=np.int64))
        self.val_set = val if val is not None else Subset(pool, np.asarray(va, dtype=np.int64))
        self.test_set = test if test is not None else Subset(pool, np.asarray(te, dtype=np.int64))
        if len(self.train_set) == 0:
            raise DataError(f"the training split of {c.train} is empty")
        if len(self.val_set) == 0:
            raise DataError(f"the validation split of {c.train} is empty (set data.n_val or data.val)")

    def _check_properties(self, spec: str, ds) -> None:
        """Every record of a property data file carries every target (else a DataError naming
        the file, the records and the properties they do have)."""
        records = ds.records if isinstance(ds, ConformationDataset) else sample_records(ds, 1000)
        property_values(records, self.properties, file=str(resolve_path(spec)))

    def world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the run: from the attached Trainer, else from an
        initialised ``torch.distributed`` process group, else ``(1, 0)``."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _loader(self, ds, sampler: torch.utils.data.Sampler | None, batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=sampler, collate_fn=self.collate_fn,
            num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0,
        )

    def _sampler(self, ds, train: bool, world: int, rank: int) -> torch.utils.data.Sampler:
        """Training: a new order of every epoch, drawn from ``(seed, epoch)`` alone and split
        between the ``world`` ranks, the same number of items on each (the at most ``world - 1``
        left over are skipped that epoch; one process: a permutation of all), weighted by source
        when ``data.source_weights`` is set. Evaluation: disjoint shards covering every item once."""
        n = len(ds)
        if n < world:
            what = "training" if train else "validation/test"
            raise DataError(
                f"the {what} set has {n} conformations, fewer than the {world} processes of this "
                "distributed run: every process needs at least one"
            )
        if not train:
            return DistributedShuffleSampler(n, world, rank, self.seed, shuffle=False, drop_last=False)
        if self.config.node_local_shards and world > 1:
            if self.config.source_weights:
                raise ConfigError("data.node_local_shards and data.source_weights cannot be combined: each node "
                                  "draws from its own shards, which need not hold every source")
            trainer = self.trainer
            nodes = int(getattr(trainer, "num_nodes", 1))
            return NodeLocalSampler(_shard_keys(ds), nodes, int(getattr(trainer, "node_rank", 0)),
                                    world // nodes, int(getattr(trainer, "local_rank", rank)), self.seed)
        if self.config.source_weights:
            from ..data.store import WeightedSourceSampler

            return WeightedSourceSampler(ds, self.config.source_weights, n, self.seed,
                                         num_replicas=world, rank=rank, drop_last=True)
        return DistributedShuffleSampler(n, world, rank, self.seed, shuffle=True, drop_last=True)

    def train_dataloader(self):
        world, rank = self.world()
        # every process, DDP or not: the epoch's order depends only on (seed, epoch), so an
        # interrupted epoch can be drawn again and continued where it stopped (state_dict)
        sampler = ResumableSampler(self._sampler(self.train_set, True, world, rank))
        if self._resume_from is not None:
            self._resume(sampler, self._resume_from, world)
            self._resume_from = None
        return self._loader(self.train_set, sampler, self.config.batch_size)

    def _eval_loader(self, ds):
        world, rank = self.world()
        # DDP: disjoint shards that cover the set once (the Trainer runs with
        # use_distributed_sampler=False, so these samplers are the ones used)
        sampler = self._sampler(ds, False, world, rank) if world > 1 else None
        return self._loader(ds, sampler, self.config.val_batch_size or self.config.batch_size)

    def val_dataloader(self):
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)

    # ------------------------------------------------------- mid-epoch resume
    def state_dict(self) -> dict:
        """Where the training stands in the current epoch, saved in every Lightning checkpoint:
        the epoch and how many of its draws (all processes together) have been trained on. A
        run resumed from a checkpoint written in the middle of an epoch continues that epoch
        with the conformations it had not yet seen (:meth:`load_state_dict`)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        loop = trainer.fit_loop
        batches = int(loop.epoch_loop.batch_progress.current.processed)
        world = int(trainer.world_size)
        return {"epoch": int(loop.epoch_progress.current.processed), "batches": batches,
                "batch_size": int(self.config.batch_size), "world_size": world,
                "position": batches * int(self.config.batch_size) * world, "seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        self._resume_from = dict(state) if state else None

    def _resume(self, sampler: "ResumableSampler", state: dict, world: int) -> None:
        """Put ``sampler`` where the checkpoint left its epoch: rank r's share of an epoch is
        every ``world``-th draw of one sequence, so the first ``position`` draws of the sequence
        are the first ``position / world`` of each rank's share, whatever the number of
        processes the run is resumed with."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if int(state.get("seed", self.seed)) != self.seed:
            log.warning("resuming with seed %d, the checkpoint's is %s: the interrupted epoch is drawn "
                        "in a different order", self.seed, state["seed"])
        skip = position // world
        if skip >= len(sampler):  # the checkpoint was written at the end of its epoch
            sampler.set_epoch(epoch + 1)
            return
        if (state.get("world_size"), state.get("batch_size")) != (world, self.config.batch_size):
            log.warning("resuming epoch %d with %d processes x batch %d (the checkpoint: %s x %s): each "
                        "process continues after draw %d of its share", epoch, world, self.config.batch_size,
                        state.get("world_size"), state.get("batch_size"), skip)
        sampler.resume(epoch, skip)
        log.info("resuming epoch %d after %d of its %d draws", epoch, position, len(sampler) * world)

    def describe(self) -> dict:
        return {
            "files": list(self.config.train),
            "equilibrium_only_molecules": self.hidden_molecules,
            "train": describe_dataset(self.train_set, "train"),
            "val": describe_dataset(self.val_set, "val"),
            "test": describe_dataset(self.test_set, "test"),
        }


def force_rms(records: list[Conformation]) -> float | None:
    """RMS of the force components of the off-equilibrium records (None if there are none)."""
    f = [r.forces for r in records if r.forces is not None and not r.equilibrium]
    if not f:
        return None
    return float(np.sqrt(np.mean(np.concatenate(f) ** 2)))
