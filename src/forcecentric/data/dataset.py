"""In-memory dataset of Conformation records and the batch format the model consumes.

A :class:`Batch` packs molecules of different sizes: atoms are concatenated and ``batch`` maps
each atom to its molecule. Missing labels are marked by ``has_energy`` / ``has_forces`` masks so
that losses apply only where a label exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..errors import DataError
from .conformation import Conformation


@dataclass
class Batch:
    z: torch.Tensor  # [N] int64
    pos: torch.Tensor  # [N, 3]
    batch: torch.Tensor  # [N] int64, molecule index of each atom
    n_atoms: torch.Tensor  # [B] int64
    energy: torch.Tensor  # [B], NaN where missing
    has_energy: torch.Tensor  # [B] bool
    forces: torch.Tensor  # [N, 3], zero where missing
    has_forces: torch.Tensor  # [B] bool
    equilibrium: torch.Tensor  # [B] bool
    charge: torch.Tensor  # [B] int64

    @property
    def n_graphs(self) -> int:
        return int(self.n_atoms.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Batch":
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[f.name] = t.to(device) if device is not None else t
        return Batch(**out)

    def atom_mask(self, graph_mask: torch.Tensor) -> torch.Tensor:
        """Expand a per-molecule mask ``[B]`` to a per-atom mask ``[N]``."""
        return graph_mask[self.batch]

    def select(self, graph_mask: torch.Tensor) -> "Batch":
        """The sub-batch of the molecules where ``graph_mask`` is True."""
        amask = self.atom_mask(graph_mask)
        new_index = torch.cumsum(graph_mask.long(), 0) - 1
        return Batch(
            z=self.z[amask],
            pos=self.pos[amask],
            batch=new_index[self.batch[amask]],
            n_atoms=self.n_atoms[graph_mask],
            energy=self.energy[graph_mask],
            has_energy=self.has_energy[graph_mask],
            forces=self.forces[amask],
            has_forces=self.has_forces[graph_mask],
            equilibrium=self.equilibrium[graph_mask],
            charge=self.charge[graph_mask],
        )

    @staticmethod
    def concat(parts: Sequence["Batch"]) -> "Batch":
        offsets = np.cumsum([0] + [p.n_graphs for p in parts[:-1]])
        return Batch(
            z=torch.cat([p.z for p in parts]),
            pos=torch.cat([p.pos for p in parts]),
            batch=torch.cat([p.batch + int(o) for p, o in zip(parts, offsets)]),
            n_atoms=torch.cat([p.n_atoms for p in parts]),
            energy=torch.cat([p.energy for p in parts]),
            has_energy=torch.cat([p.has_energy for p in parts]),
            forces=torch.cat([p.forces for p in parts]),
            has_forces=torch.cat([p.has_forces for p in parts]),
            equilibrium=torch.cat([p.equilibrium for p in parts]),
            charge=torch.cat([p.charge for p in parts]),
        )


def collate(records: Sequence[Conformation]) -> Batch:
    """Pack conformations into one :class:`Batch` (float32 positions and labels)."""
    if len(records) == 0:
        raise DataError("cannot build a batch from zero conformations")
    n_atoms = [r.n_atoms for r in records]
    z = np.concatenate([r.z for r in records])
    pos = np.concatenate([r.pos for r in records]).astype(np.float32)
    forces = np.concatenate(
        [r.forces if r.forces is not None else np.zeros((r.n_atoms, 3)) for r in records]
    ).astype(np.float32)
    energy = np.array([np.nan if r.energy is None else r.energy for r in records], dtype=np.float64)
    return Batch(
        z=torch.from_numpy(z),
        pos=torch.from_numpy(pos),
        batch=torch.repeat_interleave(torch.arange(len(records)), torch.tensor(n_atoms)),
        n_atoms=torch.tensor(n_atoms, dtype=torch.long),
        # energies stay float64 until the model's dtype is known: totals of large molecules
        # (~1e4 eV) lose meV precision in float32
        energy=torch.from_numpy(energy),
        has_energy=torch.tensor([r.energy is not None for r in records]),
        forces=torch.from_numpy(forces),
        has_forces=torch.tensor([r.forces is not None for r in records]),
        equilibrium=torch.tensor([bool(r.equilibrium) for r in records]),
        charge=torch.tensor([int(r.charge) for r in records], dtype=torch.long),
    )


class ConformationDataset(torch.utils.data.Dataset):
    """A list of validated conformations held in memory."""

    def __init__(self, records: Sequence[Conformation], name: str = ""):
        self.records = list(records)
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> Conformation:
        return self.records[idx]

    def elements(self) -> list[int]:
        return sorted({int(x) for r in self.records for x in np.unique(r.z)})

    def describe(self) -> dict:
        """Counts used in checkpoints and run directories to describe the training data."""
        n_eq = sum(bool(r.equilibrium) for r in self.records)
        sources = Counter(r.source for r in self.records)
        mols = Counter(r.mol_id for r in self.records)
        return {
            "name": self.name,
            "n_conformations": len(self.records),
            "n_equilibrium": n_eq,
            "n_off_equilibrium": len(self.records) - n_eq,
            "n_with_forces": sum(r.forces is not None for r in self.records),
            "n_with_energy": sum(r.energy is not None for r in self.records),
            "n_molecules": len(mols),
            "sources": dict(sources),
            "elements": self.elements(),
            "levels_of_theory": sorted({r.level_of_theory for r in self.records if r.level_of_theory}),
        }


def property_values(
    records: Sequence[Conformation], names: Sequence[str], file: str | None = None
) -> np.ndarray:
    """The molecular properties ``names`` of ``records`` (from ``Conformation.info``) as a float64
    array ``[len(records), len(names)]``.

    Raises :class:`DataError` naming the records that lack a property (or hold a non-numeric or
    non-finite value) and the properties the records do have.
    """
    out = np.full((len(records), len(names)), np.nan)
    missing: dict[str, list[int]] = {}
    bad: list[str] = []
    for i, r in enumerate(records):
        for k, name in enumerate(names):
            value = r.info.get(name)
            if value is None:
                missing.setdefault(name, []).append(i)
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                bad.append(f"record {i}: {name}={value!r} is not a number")
                continue
            if not np.isfinite(value):
                bad.append(f"record {i}: {name} is {value}")
            out[i, k] = value
    if missing or bad:
        where = f"file {file!r}: " if file else ""
        lines = []
        for name, idx in missing.items():
            shown = ", ".join(str(i) for i in idx[:10]) + (f" and {len(idx) - 10} more" if len(idx) > 10 else "")
            lines.append(f"{len(idx)} of {len(records)} records lack the property {name!r} (records {shown})")
        lines.extend(bad[:10])
        if missing:
            first = records[next(iter(missing.values()))[0]]
            have = sorted(k for k, v in first.info.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            lines.append(f"numeric properties such a record has: {have or 'none'}")
        raise DataError(where + "; ".join(lines))
    return out


class PropertyCollate:
    """Collate function for property training: ``(Batch, y [B, T])`` with the properties
    ``names`` of each record (float64), checked to be present and finite."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)

    def __call__(self, records: Sequence[Conformation]) -> tuple[Batch, torch.Tensor]:
        return collate(records), torch.from_numpy(property_values(records, self.names))
