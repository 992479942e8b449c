"""Lightning data module: reads the configured files, validates them and splits them."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ..config import DataConfig
from ..data import read_all
from ..data.conformation import Conformation
from ..data.dataset import ConformationDataset, collate
from ..data.splits import molecule_split, random_split
from ..errors import DataError

BUNDLED_PREFIX = "bundled:"


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bundled"


def resolve_path(spec: str) -> Path:
    """``bundled:NAME`` names a dataset shipped with the package; anything else is a path."""
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX):]
        candidates = sorted(bundled_dir().glob(name + "*"))
        if not candidates:
            known = sorted(p.stem for p in bundled_dir().glob("*.extxyz"))
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


class ForceFieldDataModule(pl.LightningDataModule):
    """Train / val / test datasets from a :class:`DataConfig`.

    When no separate val / test files are given they are carved out of the training files,
    at random or by molecule identity, reproducibly from ``seed``.
    """

    def __init__(self, config: DataConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.seed = seed
        self.train_set: ConformationDataset | None = None
        self.val_set: ConformationDataset | None = None
        self.test_set: ConformationDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.config
        if not c.train:
            raise DataError("data.train lists no files: nothing to train on")
        pool = load_records(c.train, c.format, c.max_force)
        val = load_records(c.val, c.format, c.max_force) if c.val else None
        test = load_records(c.test, c.format, c.max_force) if c.test else None
        # val and test are drawn first, so they stay the same whatever n_train is
        sizes = [0 if val is not None else c.n_val, 0 if test is not None else c.n_test, c.n_train]
        if c.n_train is not None:
            sizes.append(None)
        if c.split_by_molecule:
            parts = molecule_split([r.mol_id for r in pool], sizes, self.seed)
        else:
            parts = random_split(len(pool), sizes, self.seed)
        va, te, tr = parts[0], parts[1], parts[2]
        self.train_set = ConformationDataset([pool[i] for i in tr], name="train")
        self.val_set = ConformationDataset(val if val is not None else [pool[i] for i in va], name="val")
        self.test_set = ConformationDataset(test if test is not None else [pool[i] for i in te], name="test")
        if len(self.train_set) == 0:
            raise DataError(f"the training split of {c.train} is empty")
        if len(self.val_set) == 0:
            raise DataError(f"the validation split of {c.train} is empty (set data.n_val or data.val)")

    def _loader(self, ds: ConformationDataset, shuffle: bool, batch_size: int) -> torch.utils.data.DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
            num_workers=self.config.num_workers, generator=gen,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, True, self.config.batch_size)

    def val_dataloader(self):
        return self._loader(self.val_set, False, self.config.val_batch_size or self.config.batch_size)

    def test_dataloader(self):
        return self._loader(self.test_set, False, self.config.val_batch_size or self.config.batch_size)

    def describe(self) -> dict:
        return {
            "files": list(self.config.train),
            "train": self.train_set.describe(),
            "val": self.val_set.describe(),
            "test": self.test_set.describe(),
        }


def force_rms(records: list[Conformation]) -> float | None:
    """RMS of the force components of the off-equilibrium records (None if there are none)."""
    f = [r.forces for r in records if r.forces is not None and not r.equilibrium]
    if not f:
        return None
    return float(np.sqrt(np.mean(np.concatenate(f) ** 2)))
