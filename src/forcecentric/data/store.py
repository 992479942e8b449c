"""Sharded HDF5 store of :class:`Conformation` records: writer, lazy torch Dataset, source sampler.

Layout of a store directory::

    STORE/
      manifest.json         format version, shard list, per-source counts, statistics, progress
      shard-00000.h5        complete shards only (written as .shard-00000.h5.tmp, then renamed)
      shard-00001.h5
      ...
      build_report.json     written by :func:`forcecentric.data.build.build_store`
      dropped.csv

Each shard holds ``n`` conformations with ``A`` atoms in all, as ragged arrays:

===========================  ============  ==========================================================
dataset                      dtype         shape / meaning
===========================  ============  ==========================================================
``z``                        uint8         ``[A]`` atomic numbers
``pos``                      float32       ``[A, 3]`` positions, Angstrom
``forces``                   float32       ``[A, 3]`` eV/Angstrom, zeros where ``has_forces`` is False
``offsets``                  int64         ``[n + 1]`` atoms of record ``i`` are ``offsets[i]:offsets[i+1]``
``energy``                   float64       ``[n]`` eV, 0 where ``has_energy`` is False
``has_energy``               bool          ``[n]``
``has_forces``               bool          ``[n]``
``charge``                   int16         ``[n]`` total charge, e
``equilibrium``              bool          ``[n]``
``source``                   uint8/16/32   ``[n]`` codes into ``source_vocab``
``level_of_theory``          uint8/16/32   ``[n]`` codes into ``level_of_theory_vocab``
``mol_id``                   uint8/16/32   ``[n]`` codes into ``mol_id_vocab``
``<field>_vocab``            uint8         UTF-8 bytes of the shard's strings, concatenated
``<field>_vocab_offsets``    int64         ``[V + 1]`` string ``k`` is ``vocab[off[k]:off[k+1]]``
``hash``                     uint64        ``[n, 2]`` 128-bit content hash (:func:`content_hash`)
===========================  ============  ==========================================================

Strings are stored once per shard (a vocabulary of concatenated bytes with offsets) rather than
as HDF5 variable-length strings, which cost a heap object each and read ~7x slower one by one.

Crash safety: a shard is written under a temporary name and renamed only when complete (after
an fsync), and the manifest is replaced atomically after every shard, so a killed build leaves
complete shards, a manifest listing exactly those, and at most a ``.tmp`` file that no reader
looks at. The manifest also carries a caller-defined ``progress`` record (for example how many
records of each input file were consumed) snapshotted together with each complete shard, which
is what makes builds resumable without duplicating records.

Reading: :class:`Store` opens shard files lazily, in the process that reads them (handles are
never pickled into DataLoader workers and are dropped after a fork), keeps at most
``max_open_shards`` files open and a bounded in-memory copy (``cache_mb``) of the per-record
arrays of the shards it reads first; a record is then two small HDF5 reads (positions, forces),
or about a dozen for shards outside that budget. Memory is bounded whatever the corpus size.

Deduplication (``StoreWriter(dedup=True)``) keeps the 16-byte hashes of all stored records in
memory (sorted uint64 runs, ~16 B per record): the one cost of building that grows with the store.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .conformation import Conformation

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "Store",
    "StoreWriter",
    "WeightedSourceSampler",
    "content_hash",
    "shard_name",
]

FORMAT = "forcecentric-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Positions are rounded to this many Angstrom before hashing (duplicates closer than this merge).
HASH_RESOLUTION = 1e-5
_HASH_SCALE = 1e5  # 1 / HASH_RESOLUTION
STRING_FIELDS = ("source", "level_of_theory", "mol_id")
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.h5$")
_TMP_RE = re.compile(r"^\.shard-(\d{5,})\.h5\.tmp$")
#: Vocabularies up to this size are read whole when a shard opens; larger ones string by string.
_VOCAB_PRELOAD = 4096


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def _tmp_name(index: int) -> str:
    return f".shard-{index:05d}.h5.tmp"


# --------------------------------------------------------------------------------------- hashing
def content_hash(z: np.ndarray, pos: np.ndarray, charge: int = 0) -> bytes:
    """16-byte BLAKE2b hash of atomic numbers, charge and positions rounded to 1e-5 Angstrom.

    Positions are cast to float32 first (the stored precision), so hashing a record read back
    from a store gives the hash stored for it.
    """
    z = np.asarray(z).reshape(-1)
    q = np.asarray(pos, dtype=np.float32).astype(np.float64)
    q *= _HASH_SCALE
    np.rint(q, out=q)
    h = hashlib.blake2b(np.array([z.shape[0], int(charge)], dtype=np.int64).tobytes(), digest_size=16)
    h.update(z.astype(np.uint8).tobytes())
    h.update(q.astype(np.int64).tobytes())
    return h.digest()


class _HashIndex:
    """Set of 128-bit hashes with small memory: sorted uint64 runs merged like a binary counter.

    ``pending`` holds the hashes of the shard being filled (a Python set); ``commit`` turns them
    into a sorted run. Lookups cost one binary search per run (O(log(n / shard_size)) runs).
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (hi sorted, lo)
        self.pending: set[bytes] = set()

    def __len__(self) -> int:
        return sum(r[0].shape[0] for r in self.runs) + len(self.pending)

    def __contains__(self, digest: bytes) -> bool:
        if digest in self.pending:
            return True
        hi, lo = np.frombuffer(digest, dtype="<u8")
        for rhi, rlo in self.runs:
            a = int(np.searchsorted(rhi, hi, side="left"))
            if a < rhi.shape[0] and rhi[a] == hi:
                b = int(np.searchsorted(rhi, hi, side="right"))
                if np.any(rlo[a:b] == lo):
                    return True
        return False

    def add_run(self, pairs: np.ndarray) -> None:
        """Add hashes given as a uint64 ``[n, 2]`` array (hi, lo)."""
        if pairs.shape[0] == 0:
            return
        pairs = np.asarray(pairs, dtype=np.uint64)
        order = np.argsort(pairs[:, 0], kind="stable")
        self.runs.append((np.ascontiguousarray(pairs[order, 0]), np.ascontiguousarray(pairs[order, 1])))
        while len(self.runs) >= 2 and self.runs[-2][0].shape[0] <= self.runs[-1][0].shape[0]:
            (h1, l1), (h2, l2) = self.runs[-2], self.runs[-1]
            self.runs[-2:] = [self._merge(h1, l1, h2, l2)]

    @staticmethod
    def _merge(h1, l1, h2, l2) -> tuple[np.ndarray, np.ndarray]:
        """Merge two sorted runs without sorting again (memory: the output plus 9 B per item)."""
        n = h1.shape[0] + h2.shape[0]
        at2 = np.searchsorted(h1, h2, side="right") + np.arange(h2.shape[0])
        from1 = np.ones(n, dtype=bool)
        from1[at2] = False
        hi = np.empty(n, dtype=np.uint64)
        lo = np.empty(n, dtype=np.uint64)
        hi[at2], lo[at2] = h2, l2
        hi[from1], lo[from1] = h1, l1
        return hi, lo

    def commit_pending(self) -> None:
        if self.pending:
            pairs = np.frombuffer(b"".join(self.pending), dtype="<u8").reshape(-1, 2)
            self.add_run(pairs)
        self.pending = set()


# -------------------------------------------------------------------------------- file helpers
def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _creation_info() -> dict:
    import h5py

    from .. import __version__

    return {
        "time": _now(),
        "forcecentric": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "platform": platform.platform(),
    }


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store at ``path`` (a directory), checked for format and version."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise DataError("store directory does not exist", file=str(path))
    if not mpath.exists():
        raise DataError("not a conformation store (no manifest.json)", file=str(path))
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"manifest cannot be read: {exc}", file=str(mpath)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} manifest", file=str(mpath))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"store format version {version} is not supported (this forcecentric reads version "
            f"{FORMAT_VERSION})",
            file=str(mpath),
        )
    return manifest


# ---------------------------------------------------------------------------------- statistics
def _shard_statistics(
    z: np.ndarray,
    n_atoms: np.ndarray,
    energy: np.ndarray,
    has_energy: np.ndarray,
    forces: np.ndarray,
    has_forces: np.ndarray,
    equilibrium: np.ndarray,
    sources: list[str],
    source_codes: np.ndarray,
    lots: list[str],
    lot_codes: np.ndarray,
) -> dict:
    """Mergeable accumulators of one shard (see :func:`_merge_statistics`)."""
    n = int(n_atoms.shape[0])
    counts = np.bincount(z.astype(np.int64), minlength=1)
    elements = {str(k): int(c) for k, c in enumerate(counts) if c}
    fmask = has_forces & ~equilibrium
    amask = np.repeat(fmask, n_atoms)
    force_sq, force_components = 0.0, 0
    block = 1 << 16  # blockwise: no shard-sized float64 temporaries
    for start in range(0, amask.shape[0], block):
        f = forces[start : start + block][amask[start : start + block]].astype(np.float64).ravel()
        force_sq += float(np.dot(f, f))
        force_components += int(f.size)
    epa = energy[has_energy] / n_atoms[has_energy]
    if epa.size:
        e_mean = float(epa.mean())
        e_m2 = float(((epa - e_mean) ** 2).sum())
    else:
        e_mean = e_m2 = 0.0
    src = np.bincount(source_codes.astype(np.int64), minlength=len(sources))
    lot = np.bincount(lot_codes.astype(np.int64), minlength=len(lots))
    return {
        "n_conformations": n,
        "n_atoms": int(n_atoms.sum()),
        "max_atoms": int(n_atoms.max()) if n else 0,
        "n_equilibrium": int(equilibrium.sum()),
        "n_with_forces": int(has_forces.sum()),
        "n_with_energy": int(has_energy.sum()),
        "elements": elements,
        "force_sq_sum": force_sq,
        "force_components": force_components,
        "energy_per_atom": {"n": int(epa.size), "mean": e_mean, "m2": e_m2},
        "sources": {s: int(c) for s, c in zip(sources, src) if c},
        "levels_of_theory": {s: int(c) for s, c in zip(lots, lot) if c},
    }


def _merge_statistics(parts: Sequence[dict]) -> dict:
    """Store statistics from per-shard accumulators.

    ``force_rms`` is the RMS of force components over off-equilibrium records with forces (the
    same quantity as :func:`forcecentric.train.datamodule.force_rms`); ``mean_energy_per_atom``
    and ``std_energy_per_atom`` are over records with an energy, of ``energy / n_atoms``.
    """
    n = sum(p["n_conformations"] for p in parts)
    atoms = sum(p["n_atoms"] for p in parts)
    elements: Counter = Counter()
    sources: Counter = Counter()
    lots: Counter = Counter()
    fsq = 0.0
    fcomp = 0
    en, emean, em2 = 0, 0.0, 0.0
    for p in parts:
        elements.update({k: v for k, v in p["elements"].items()})
        sources.update(p["sources"])
        lots.update(p["levels_of_theory"])
        fsq += p["force_sq_sum"]
        fcomp += p["force_components"]
        q = p["energy_per_atom"]
        if q["n"]:
            tot = en + q["n"]
            delta = q["mean"] - emean
            emean += delta * q["n"] / tot
            em2 += q["m2"] + delta * delta * en * q["n"] / tot
            en = tot
    n_eq = sum(p["n_equilibrium"] for p in parts)
    return {
        "n_conformations": n,
        "n_atoms": atoms,
        "mean_atoms": atoms / n if n else 0.0,
        "max_atoms": max((p["max_atoms"] for p in parts), default=0),
        "n_equilibrium": n_eq,
        "n_off_equilibrium": n - n_eq,
        "n_with_forces": sum(p["n_with_forces"] for p in parts),
        "n_with_energy": sum(p["n_with_energy"] for p in parts),
        "elements": {k: elements[k] for k in sorted(elements, key=int)},
        "force_rms": math.sqrt(fsq / fcomp) if fcomp else None,
        "mean_energy_per_atom": emean if en else None,
        "std_energy_per_atom": math.sqrt(em2 / en) if en else None,
        "sources": dict(sorted(sources.items())),
        "levels_of_theory": dict(sorted(lots.items())),
    }


# -------------------------------------------------------------------------------------- writer
def _code_dtype(size: int) -> np.dtype:
    if size <= 1 << 8:
        return np.dtype(np.uint8)
    if size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _encode_vocab(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    raw = [w.encode("utf-8") for w in words]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    if raw:
        offsets[1:] = np.cumsum([len(r) for r in raw])
    chars = np.frombuffer(b"".join(raw), dtype=np.uint8).copy()
    return chars, offsets


class _ShardBuffer:
    """Records of the shard being filled, in compact numpy arrays (grown by doubling)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.n = 0
        self.n_atoms_total = 0
        atom_cap = max(1024, min(capacity, 4096) * 32)
        self.z = np.zeros(atom_cap, dtype=np.uint8)
        self.pos = np.zeros((atom_cap, 3), dtype=np.float32)
        self.forces = np.zeros((atom_cap, 3), dtype=np.float32)
        c = min(capacity, 4096)
        self.n_atoms = np.zeros(c, dtype=np.int64)
        self.energy = np.zeros(c, dtype=np.float64)
        self.has_energy = np.zeros(c, dtype=bool)
        self.has_forces = np.zeros(c, dtype=bool)
        self.charge = np.zeros(c, dtype=np.int16)
        self.equilibrium = np.zeros(c, dtype=bool)
        self.codes = {f: np.zeros(c, dtype=np.uint32) for f in STRING_FIELDS}
        self.hash = np.zeros((c, 2), dtype=np.uint64)
        self.vocab: dict[str, dict[str, int]] = {f: {} for f in STRING_FIELDS}

    def _grow_records(self) -> None:
        c = self.n_atoms.shape[0] * 2
        for name in ("n_atoms", "energy", "has_energy", "has_forces", "charge", "equilibrium", "hash"):
            old = getattr(self, name)
            new = np.zeros((c,) + old.shape[1:], dtype=old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        for f in STRING_FIELDS:
            new = np.zeros(c, dtype=np.uint32)
            new[: self.n] = self.codes[f][: self.n]
            self.codes[f] = new

    def _grow_atoms(self, need: int) -> None:
        cap = self.z.shape[0]
        while cap < need:
            cap *= 2
        for name in ("z", "pos", "forces"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], dtype=old.dtype)
            new[: self.n_atoms_total] = old[: self.n_atoms_total]
            setattr(self, name, new)

    def append(self, conf: Conformation, digest: bytes) -> None:
        k = self.n
        if k == self.n_atoms.shape[0]:
            self._grow_records()
        m = conf.z.shape[0]
        a = self.n_atoms_total
        if a + m > self.z.shape[0]:
            self._grow_atoms(a + m)
        self.z[a : a + m] = conf.z
        self.pos[a : a + m] = conf.pos
        if conf.forces is not None:
            self.forces[a : a + m] = conf.forces
            self.has_forces[k] = True
        else:
            self.forces[a : a + m] = 0.0
            self.has_forces[k] = False
        if conf.energy is not None:
            self.energy[k] = conf.energy
            self.has_energy[k] = True
        else:
            self.energy[k] = 0.0
            self.has_energy[k] = False
        self.n_atoms[k] = m
        self.charge[k] = conf.charge
        self.equilibrium[k] = bool(conf.equilibrium)
        for f in STRING_FIELDS:
            vocab = self.vocab[f]
            s = str(getattr(conf, f) or "")
            code = vocab.get(s)
            if code is None:
                code = vocab[s] = len(vocab)
            self.codes[f][k] = code
        self.hash[k] = np.frombuffer(digest, dtype="<u8")
        self.n = k + 1
        self.n_atoms_total = a + m

    def write(self, path: Path, index: int) -> dict:
        """Write the buffer as one HDF5 shard; return its statistics accumulators."""
        import h5py

        n, a = self.n, self.n_atoms_total
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.n_atoms[:n], out=offsets[1:])
        words = {f: list(self.vocab[f]) for f in STRING_FIELDS}
        with h5py.File(path, "w") as f:
            f.attrs["format"] = FORMAT + "-shard"
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["index"] = index
            f.attrs["n_conformations"] = n
            f.attrs["n_atoms"] = a
            f.create_dataset("z", data=self.z[:a])
            f.create_dataset("pos", data=self.pos[:a])
            f.create_dataset("forces", data=self.forces[:a])
            f.create_dataset("offsets", data=offsets)
            f.create_dataset("energy", data=self.energy[:n])
            f.create_dataset("has_energy", data=self.has_energy[:n])
            f.create_dataset("has_forces", data=self.has_forces[:n])
            f.create_dataset("charge", data=self.charge[:n])
            f.create_dataset("equilibrium", data=self.equilibrium[:n])
            for field in STRING_FIELDS:
                f.create_dataset(field, data=self.codes[field][:n].astype(_code_dtype(len(words[field]))))
                chars, voff = _encode_vocab(words[field])
                f.create_dataset(f"{field}_vocab", data=chars)
                f.create_dataset(f"{field}_vocab_offsets", data=voff)
            f.create_dataset("hash", data=self.hash[:n])
        return _shard_statistics(
            self.z[:a],
            self.n_atoms[:n],
            self.energy[:n],
            self.has_energy[:n],
            self.forces[:a],
            self.has_forces[:n],
            self.equilibrium[:n],
            words["source"],
            self.codes["source"][:n],
            words["level_of_theory"],
            self.codes["level_of_theory"][:n],
        )


class StoreWriter:
    """Write Conformation records into a sharded store; resumable after a crash.

    Usage::

        with StoreWriter("corpus.store", shard_size=100_000) as w:
            for conf in records:
                w.add(conf)

    ``add`` checks shapes, finite values and ranges (not geometry: see
    :meth:`Conformation.validate`) and, when ``dedup`` is on, returns False for a record whose
    :func:`content_hash` is already in the store. A shard is written when it is full and the
    next record arrives, or at :meth:`close`; leaving the ``with`` block by an exception (or
    calling :meth:`abort`) drops the unfinished shard and leaves a resumable store.

    Resuming: ``StoreWriter(path, resume=True)`` reopens an existing store and continues after
    its complete shards. To know where to continue, callers keep whatever they need in the
    JSON-serializable dict :attr:`progress` (conventionally
    ``progress["inputs"][key]["consumed"]``, see :meth:`consumed` / :meth:`set_consumed`),
    updated after each input record is handled. It is saved in the manifest together with each
    complete shard, so after a crash it describes exactly what the complete shards contain.

    Args:
        path: the store directory (created if needed).
        shard_size: conformations per shard.
        resume: continue an existing store (a missing store starts empty).
        overwrite: delete an existing store's manifest and shards first.
        dedup: skip records whose content hash is already stored (within and across shards).
        metadata: JSON-serializable description kept in the manifest (``metadata`` key).
    """

    def __init__(
        self,
        path: str | Path,
        shard_size: int = 100_000,
        *,
        resume: bool = False,
        overwrite: bool = False,
        dedup: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if int(shard_size) < 1:
            raise DataError(f"shard_size must be positive, got {shard_size}")
        self.path = Path(path)
        self.shard_size = int(shard_size)
        self.dedup = bool(dedup)
        self._hashes = _HashIndex()
        self._closed = False
        self._n_added = 0  # records added through this writer (for error messages)
        mpath = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise DataError("store path exists and is not a directory", file=str(self.path))
        exists = mpath.exists()
        if exists and overwrite:
            self._remove_store_files()
            exists = False
        elif exists and not resume:
            raise DataError(
                "a store already exists here; pass resume=True to continue it or overwrite=True to "
                "replace it",
                file=str(self.path),
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if exists:
            manifest = read_manifest(self.path)
            self._shards: list[dict] = list(manifest.get("shards", []))
            self.progress: dict = manifest.get("progress") or {}
            self._created = manifest.get("created") or _creation_info()
            self.metadata = dict(manifest.get("metadata") or {})
            if metadata:
                self.metadata.update(metadata)
            self._clean_leftovers()
            if self.dedup:
                self._load_hashes()
        else:
            self._shards = []
            self.progress = {}
            self._created = _creation_info()
            self.metadata = dict(metadata or {})
            self._clean_leftovers()
        self._buffer = _ShardBuffer(self.shard_size)
        self._write_manifest(complete=False)

    # ------------------------------------------------------------------ public
    @property
    def n_conformations(self) -> int:
        """Conformations in complete shards plus the shard being filled."""
        return sum(s["n_conformations"] for s in self._shards) + self._buffer.n

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def consumed(self, key: str) -> int:
        """Records of input ``key`` handled by the complete shards (0 for a new input)."""
        return int(self.progress.get("inputs", {}).get(str(key), {}).get("consumed", 0))

    def set_consumed(self, key: str, consumed: int, *, done: bool | None = None) -> None:
        """Record that the first ``consumed`` records of input ``key`` have been handled."""
        entry = self.progress.setdefault("inputs", {}).setdefault(str(key), {})
        entry["consumed"] = int(consumed)
        if done is not None:
            entry["done"] = bool(done)

    def __contains__(self, conf: Conformation) -> bool:
        return content_hash(conf.z, conf.pos, conf.charge) in self._hashes

    def add(self, conf: Conformation, *, checked: bool = False) -> bool:
        """Append one record; False (and nothing stored) if ``dedup`` is on and it is a duplicate.

        ``checked=True`` skips the shape / finiteness checks for a record that already passed
        :meth:`Conformation.validate`.
        """
        if self._closed:
            raise DataError("the store writer is closed", file=str(self.path))
        if not checked:
            self._check(conf)
        elif not -32768 <= int(conf.charge) <= 32767:
            raise DataError(f"charge {conf.charge} does not fit the store's int16", file=str(self.path),
                            record=self._n_added)
        digest = content_hash(conf.z, conf.pos, conf.charge)
        if self.dedup and digest in self._hashes:
            return False
        if self._buffer.n >= self.shard_size:
            self._flush()
        self._buffer.append(conf, digest)
        if self.dedup:
            self._hashes.pending.add(digest)
        self._n_added += 1
        return True

    def flush(self) -> None:
        """Write the records added so far as a (possibly short) shard now."""
        if self._buffer.n:
            self._flush()

    def close(self) -> None:
        """Write the last shard and mark the store complete."""
        if self._closed:
            return
        self.flush()
        self._write_manifest(complete=True)
        self._closed = True

    def abort(self) -> None:
        """Drop the unfinished shard; the store stays resumable from its complete shards."""
        self._buffer = _ShardBuffer(self.shard_size)
        self._hashes.pending = set()
        self._closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ----------------------------------------------------------------- internals
    def _check(self, conf: Conformation) -> None:
        rec = self._n_added

        def fail(problem: str) -> None:
            raise DataError(problem, file=str(self.path), record=rec)

        n = conf.z.shape[0]
        if n == 0:
            fail("conformation has no atoms")
        if conf.pos.shape != (n, 3):
            fail(f"positions have shape {conf.pos.shape}, expected ({n}, 3)")
        if conf.forces is not None and conf.forces.shape != (n, 3):
            fail(f"forces have shape {conf.forces.shape}, expected ({n}, 3)")
        if int(conf.z.min()) < 1 or int(conf.z.max()) > 118:
            fail(f"invalid atomic numbers {sorted(set(conf.z.tolist()))}")
        if not np.isfinite(conf.pos).all():
            fail("positions contain NaN or Inf")
        if conf.forces is not None and not np.isfinite(conf.forces).all():
            fail("forces contain NaN or Inf")
        if conf.energy is not None and not math.isfinite(conf.energy):
            fail(f"energy is {conf.energy}")
        if not -32768 <= int(conf.charge) <= 32767:
            fail(f"charge {conf.charge} does not fit the store's int16")

    def _flush(self) -> None:
        index = len(self._shards)
        name = shard_name(index)
        tmp = self.path / _tmp_name(index)
        final = self.path / name
        stats = self._buffer.write(tmp, index)
        _fsync_path(tmp)
        sha = _sha256(tmp)
        nbytes = tmp.stat().st_size
        self._commit_shard(tmp, final)
        self._shards.append(
            {
                "file": name,
                "n_conformations": self._buffer.n,
                "n_atoms": self._buffer.n_atoms_total,
                "bytes": nbytes,
                "sha256": sha,
                "statistics": stats,
            }
        )
        self._buffer = _ShardBuffer(self.shard_size)
        if self.dedup:
            self._hashes.commit_pending()
        self._write_manifest(complete=False)

    def _commit_shard(self, tmp: Path, final: Path) -> None:
        os.replace(tmp, final)
        _fsync_path(self.path)

    def _write_manifest(self, complete: bool) -> None:
        parts = [s["statistics"] for s in self._shards]
        stats = _merge_statistics(parts)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": bool(complete),
            "created": self._created,
            "updated": _now(),
            "shard_size": self.shard_size,
            "dedup": self.dedup,
            "hash_resolution": HASH_RESOLUTION,
            "n_conformations": stats["n_conformations"],
            "n_atoms": stats["n_atoms"],
            "n_shards": len(self._shards),
            "bytes": sum(s["bytes"] for s in self._shards),
            "sources": stats["sources"],
            "statistics": stats,
            "shards": self._shards,
            "metadata": self.metadata,
            "progress": copy.deepcopy(self.progress),
        }
        atomic_write_json(self.path / MANIFEST, manifest)

    def _clean_leftovers(self) -> None:
        """Remove temporary shards and shard files the manifest does not list (a crash's debris)."""
        listed = {s["file"] for s in self._shards}
        for p in self.path.iterdir():
            if _TMP_RE.match(p.name) or (_SHARD_RE.match(p.name) and p.name not in listed):
                p.unlink()

    def _remove_store_files(self) -> None:
        for p in self.path.iterdir():
            if p.name == MANIFEST or _SHARD_RE.match(p.name) or _TMP_RE.match(p.name):
                p.unlink()

    def _load_hashes(self) -> None:
        import h5py

        for s in self._shards:
            p = self.path / s["file"]
            try:
                with h5py.File(p, "r", locking=False) as f:
                    self._hashes.add_run(f["hash"][...])
            except (OSError, KeyError, ValueError) as exc:
                raise DataError(f"shard cannot be read to resume the store: {exc}", file=str(p)) from None


# -------------------------------------------------------------------------------------- reader
class _Vocab:
    """A shard's string table: in memory (``raw`` bytes + offsets) or read string by string."""

    def __init__(self, chars, offsets, *, in_memory: bool) -> None:
        self.size = int(offsets.shape[0]) - 1
        self.words: list[str] | None = None
        if in_memory or self.size <= _VOCAB_PRELOAD:
            self.raw = chars[...].tobytes()
            self.offsets = np.asarray(offsets[...], dtype=np.int64)
            if self.size <= _VOCAB_PRELOAD:
                off = self.offsets.tolist()
                self.words = [self.raw[off[k] : off[k + 1]].decode("utf-8") for k in range(self.size)]
            self.on_disk = False
        else:
            self.chars, self.offsets = chars, offsets
            self.on_disk = True

    @property
    def nbytes(self) -> int:
        return 0 if self.on_disk else len(self.raw) + self.offsets.nbytes

    def __getitem__(self, code: int) -> str:
        if self.words is not None:
            return self.words[code]
        if self.on_disk:
            a, b = self.offsets[code : code + 2]
            return self.chars[a:b].tobytes().decode("utf-8")
        return self.raw[self.offsets[code] : self.offsets[code + 1]].decode("utf-8")

    def all(self) -> list[str]:
        if self.words is not None:
            return list(self.words)
        raw = self.chars[...].tobytes() if self.on_disk else self.raw
        off = (self.offsets[...] if self.on_disk else self.offsets).tolist()
        return [raw[off[k] : off[k + 1]].decode("utf-8") for k in range(self.size)]


_SHARD_DATASETS = (
    "z", "pos", "forces", "offsets", "energy", "has_energy", "has_forces", "charge", "equilibrium",
    "source", "level_of_theory", "mol_id", "hash",
) + tuple(f"{f}_vocab" for f in STRING_FIELDS) + tuple(f"{f}_vocab_offsets" for f in STRING_FIELDS)
#: Per-record arrays (and ``z``) that :class:`_ShardMeta` holds in memory.
_META_DATASETS = ("offsets", "energy", "has_energy", "has_forces", "charge", "equilibrium",
                  "source", "level_of_theory", "mol_id", "z")

_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError)


class _Shard:
    """One open shard file (h5py handle and dataset objects), opened in the reading process."""

    def __init__(self, path: Path, entry: dict) -> None:
        import h5py

        self.path = path
        self.file = None
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError("shard file is missing", file=str(path)) from None
        expected = entry.get("bytes")
        if expected is not None and size != expected:
            raise DataError(
                f"shard file has {size} bytes but the manifest records {expected} "
                "(truncated, corrupted or replaced)",
                file=str(path),
            )
        try:
            self.file = h5py.File(path, "r", locking=False)
            attrs = self.file.attrs
            n = int(attrs["n_conformations"])
            a = int(attrs["n_atoms"])
            self.ds = {name: self.file[name] for name in _SHARD_DATASETS}
            if n != entry["n_conformations"] or a != entry["n_atoms"]:
                raise DataError(
                    f"shard holds {n} conformations / {a} atoms but the manifest records "
                    f"{entry['n_conformations']} / {entry['n_atoms']}",
                    file=str(path),
                )
            if self.ds["offsets"].shape != (n + 1,) or self.ds["pos"].shape != (a, 3):
                raise DataError("shard datasets have inconsistent shapes", file=str(path))
            self.vocab = {
                f: _Vocab(self.ds[f"{f}_vocab"], self.ds[f"{f}_vocab_offsets"], in_memory=False)
                for f in STRING_FIELDS
            }
        except DataError:
            self.close()
            raise
        except _READ_ERRORS as exc:
            self.close()
            raise DataError(f"shard is corrupted or truncated: {exc}", file=str(path)) from None
        self.n = n

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - closing a broken file must not mask the real error
                pass
            self.file = None

    def fail(self, exc: BaseException, record: int | None = None) -> DataError:
        return DataError(f"shard cannot be read: {type(exc).__name__}: {exc}", file=str(self.path), record=record)

    def read(self, j: int, meta: "_ShardMeta | None" = None) -> Conformation:
        """Record ``j``: per-record values from ``meta`` when given, else from the file."""
        ds = self.ds
        try:
            if meta is not None:
                m = meta
                a, b = int(m.offsets[j]), int(m.offsets[j + 1])
                has_forces = bool(m.has_forces[j])
                return Conformation(
                    z=m.z[a:b],
                    pos=ds["pos"][a:b],
                    energy=float(m.energy[j]) if m.has_energy[j] else None,
                    forces=ds["forces"][a:b] if has_forces else None,
                    charge=int(m.charge[j]),
                    equilibrium=bool(m.equilibrium[j]),
                    source=m.vocab["source"][int(m.source[j])],
                    level_of_theory=m.vocab["level_of_theory"][int(m.level_of_theory[j])],
                    mol_id=m.vocab["mol_id"][int(m.mol_id[j])],
                )
            a, b = (int(x) for x in ds["offsets"][j : j + 2])
            has_forces = bool(ds["has_forces"][j])
            has_energy = bool(ds["has_energy"][j])
            return Conformation(
                z=ds["z"][a:b],
                pos=ds["pos"][a:b],
                energy=float(ds["energy"][j]) if has_energy else None,
                forces=ds["forces"][a:b] if has_forces else None,
                charge=int(ds["charge"][j]),
                equilibrium=bool(ds["equilibrium"][j]),
                source=self.vocab["source"][int(ds["source"][j])],
                level_of_theory=self.vocab["level_of_theory"][int(ds["level_of_theory"][j])],
                mol_id=self.vocab["mol_id"][int(ds["mol_id"][j])],
            )
        except _READ_ERRORS as exc:
            raise self.fail(exc, j) from None

    def column(self, name: str) -> np.ndarray:
        try:
            return self.ds[name][...]
        except _READ_ERRORS as exc:
            raise self.fail(exc) from None

    def column_strings(self, field: str) -> np.ndarray:
        """Per-record strings of ``field`` as an object array (shared str objects)."""
        try:
            words = np.empty(self.vocab[field].size, dtype=object)
            words[:] = self.vocab[field].all()
            return words[self.ds[field][...].astype(np.int64)]
        except _READ_ERRORS as exc:
            raise self.fail(exc) from None


class _ShardMeta:
    """A shard's per-record arrays and atomic numbers held in memory (a few tens of B/record)."""

    def __init__(self, shard: _Shard) -> None:
        try:
            for name in _META_DATASETS:
                setattr(self, name, shard.ds[name][...])
            self.vocab = {
                f: _Vocab(shard.ds[f"{f}_vocab"], shard.ds[f"{f}_vocab_offsets"], in_memory=True)
                for f in STRING_FIELDS
            }
        except _READ_ERRORS as exc:
            raise shard.fail(exc) from None
        self.nbytes = sum(getattr(self, k).nbytes for k in _META_DATASETS) + sum(
            v.nbytes for v in self.vocab.values()
        )


class Store(torch.utils.data.Dataset):
    """A conformation store read lazily as a torch Dataset of :class:`Conformation` records.

    Only the manifest is read when the store is opened. Shard files are opened on first use in
    the process that reads them (after a fork, e.g. in DataLoader workers, handles are
    reopened; pickling drops them), at most ``max_open_shards`` at a time.

    Memory is bounded whatever the corpus size: each process keeps the per-record arrays and
    atomic numbers (about ``27 + mean_atoms`` bytes per record) of the shards it reads first,
    up to ``cache_mb`` megabytes, which makes a record two small HDF5 reads (positions,
    forces); records of further shards are read entirely from the file (about a dozen reads).
    ``cache_mb=0`` reads everything from the files.

    Args:
        path: the store directory.
        max_open_shards: shard files kept open per process (least recently used closed first).
        cache_mb: per-process budget for in-memory per-record arrays.
        allow_incomplete: read a store whose build did not finish (only its complete shards);
            otherwise that is an error.
        skip_bad_shards: open every shard now and leave out, with a warning naming each file and
            its problem, the ones that are missing, truncated, corrupted (unreadable HDF5) or
            inconsistent with the manifest; their conformations are not in the dataset
            (``skipped_shards`` lists them). Default: such a shard raises a
            :class:`~forcecentric.errors.DataError` naming it when it is first read. The check
            is the cheap one (file size, header, counts, shapes); ``verify()`` adds checksums.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_open_shards: int = 16,
        cache_mb: float = 64.0,
        allow_incomplete: bool = False,
        skip_bad_shards: bool = False,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete", False):
            if not allow_incomplete:
                raise DataError(
                    "store is incomplete (its build was interrupted); resume the build, or open it "
                    "with allow_incomplete=True to read its complete shards",
                    file=str(self.path),
                )
            warnings.warn(f"reading the complete shards of an unfinished store {self.path}", stacklevel=2)
        self._entries: list[dict] = list(self.manifest["shards"])
        #: ``{"file": name, "problem": message}`` of the shards left out by ``skip_bad_shards``
        self.skipped_shards: list[dict] = []
        if skip_bad_shards:
            good = []
            for entry in self._entries:
                try:
                    _Shard(self.path / entry["file"], entry).close()
                    good.append(entry)
                except DataError as exc:
                    self.skipped_shards.append({"file": entry["file"], "problem": str(exc),
                                                "n_conformations": int(entry["n_conformations"])})
                    warnings.warn(f"skipping shard {str(self.path / entry['file'])!r} "
                                  f"({int(entry['n_conformations'])} conformations): {exc}", stacklevel=2)
            self._entries = good
        counts = [int(s["n_conformations"]) for s in self._entries]
        self._starts = [0] + list(np.cumsum(counts[:-1]).tolist()) if counts else []
        self._ends = list(np.cumsum(counts).tolist()) if counts else []
        self._len = int(sum(counts))
        self.max_open_shards = max(1, int(max_open_shards))
        self.cache_bytes = int(max(0.0, float(cache_mb)) * 2**20)
        self._reset_handles()

    # ------------------------------------------------------------------ handles
    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._meta: dict[int, _ShardMeta | None] = {}  # None: decided not to cache
        self._meta_bytes = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_meta"] = {}
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def _shard(self, k: int) -> _Shard:
        if self._pid != os.getpid():
            # a forked child inherits the parent's handles: never use them, open its own
            self._reset_handles()
        sh = self._open.get(k)
        if sh is not None:
            self._open.move_to_end(k)
            return sh
        sh = _Shard(self.path / self._entries[k]["file"], self._entries[k])
        self._open[k] = sh
        while len(self._open) > self.max_open_shards:
            _, old = self._open.popitem(last=False)
            old.close()
        return sh

    def _shard_meta(self, k: int, sh: _Shard) -> _ShardMeta | None:
        if k in self._meta:
            return self._meta[k]
        entry = self._entries[k]
        estimate = 40 * entry["n_conformations"] + entry["n_atoms"]
        meta = None
        if self._meta_bytes + estimate <= self.cache_bytes:
            meta = _ShardMeta(sh)
            self._meta_bytes += meta.nbytes
        self._meta[k] = meta
        return meta

    def close(self) -> None:
        """Close the shard files this process has open (they reopen on the next read)."""
        if self._pid == os.getpid():
            for sh in self._open.values():
                sh.close()
        self._reset_handles()

    # ------------------------------------------------------------------ dataset
    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, index inside that shard) of a global record index."""
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for a store of {self._len} conformations")
        k = bisect.bisect_right(self._ends, i)
        return k, i - self._starts[k]

    def __getitem__(self, index: int) -> Conformation:
        k, j = self.locate(index)
        sh = self._shard(k)
        return sh.read(j, self._shard_meta(k, sh))

    def __iter__(self) -> Iterator[Conformation]:
        for i in range(self._len):
            yield self[i]

    @property
    def n_shards(self) -> int:
        return len(self._entries)

    @property
    def shard_files(self) -> list[Path]:
        return [self.path / s["file"] for s in self._entries]

    def subset(self, indices: Sequence[int]) -> torch.utils.data.Subset:
        return torch.utils.data.Subset(self, list(map(int, indices)))

    # ------------------------------------------------------------------ metadata
    def statistics(self) -> dict:
        """Statistics recorded in the manifest (see :func:`_merge_statistics`)."""
        return copy.deepcopy(self.manifest["statistics"])

    def elements(self) -> list[int]:
        return sorted(int(k) for k in self.manifest["statistics"]["elements"])

    def _column(self, field: str) -> np.ndarray:
        parts = []
        for k in range(self.n_shards):
            parts.append(self._shard(k).column_strings(field))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=object)

    def mol_ids(self) -> np.ndarray:
        """Molecule id of every record (object array of str), read shard by shard."""
        return self._column("mol_id")

    def sources(self) -> np.ndarray:
        """Source name of every record (object array of str)."""
        return self._column("source")

    def equilibrium_flags(self) -> np.ndarray:
        """Equilibrium flag of every record (bool ``[n]``), read from the index columns."""
        parts = [self._shard(k).column("equilibrium").astype(bool) for k in range(self.n_shards)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def shard_numbers(self) -> np.ndarray:
        """Per-record number of its shard in the manifest (``shard_numbers()[i]`` is the
        position in ``manifest["shards"]`` of the file holding record ``i``; skipped shards keep
        their numbers out of the count), from the manifest alone: nothing is read."""
        position = {e["file"]: k for k, e in enumerate(self.manifest["shards"])}
        numbers = [position[e["file"]] for e in self._entries]
        counts = [int(e["n_conformations"]) for e in self._entries]
        dtype = np.uint16 if len(self.manifest["shards"]) < 1 << 16 else np.uint32
        return np.repeat(np.asarray(numbers, dtype=dtype), counts)

    def source_codes(self) -> tuple[np.ndarray, list[str]]:
        """Per-record source as small integer codes into a sorted list of names."""
        names = sorted(self.manifest["statistics"]["sources"])
        lookup = {s: i for i, s in enumerate(names)}
        dtype = np.int16 if len(names) < 1 << 15 else np.int32
        parts = []
        for k in range(self.n_shards):
            sh = self._shard(k)
            local = np.asarray([lookup.get(w, -1) for w in sh.vocab["source"].all()], dtype=dtype)
            parts.append(local[sh.column("source").astype(np.int64)])
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), names

    def hashes(self) -> np.ndarray:
        """Content hashes of every record, uint64 ``[n, 2]``."""
        parts = []
        for k in range(self.n_shards):
            parts.append(self._shard(k).column("hash"))
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.uint64)

    def describe(self) -> dict:
        """The same description as :meth:`ConformationDataset.describe` (for run records)."""
        st = self.manifest["statistics"]
        mols: set[str] = set()
        for k in range(self.n_shards):
            mols.update(self._shard(k).vocab["mol_id"].all())
        return {
            "name": str(self.path),
            "n_conformations": st["n_conformations"],
            "n_equilibrium": st["n_equilibrium"],
            "n_off_equilibrium": st["n_off_equilibrium"],
            "n_with_forces": st["n_with_forces"],
            "n_with_energy": st["n_with_energy"],
            "n_molecules": len(mols),
            "sources": dict(st["sources"]),
            "elements": self.elements(),
            "levels_of_theory": sorted(k for k in st["levels_of_theory"] if k),
            **({"n_conformations": self._len, "skipped_shards": copy.deepcopy(self.skipped_shards),
                "note": "counts other than n_conformations include the skipped shards (manifest statistics)"}
               if self.skipped_shards else {}),
        }

    def verify(self, checksums: bool = True) -> None:
        """Open every shard and check its size, counts and (optionally) its SHA-256."""
        for k, entry in enumerate(self._entries):
            path = self.path / entry["file"]
            _Shard(path, entry).close()
            if checksums and entry.get("sha256") and _sha256(path) != entry["sha256"]:
                raise DataError("shard checksum does not match the manifest (corrupted)", file=str(path))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n={self._len}, shards={self.n_shards})"


# ------------------------------------------------------------------------------------- sampler
def _source_labels(data: Any) -> tuple[np.ndarray, list[str]]:
    """Per-item source codes and names for a Store, a Subset or ConcatDataset of stores and
    datasets, a dataset or a name list. Stores answer from their index columns, as small
    integer codes: no per-item strings, whatever the corpus size."""
    if isinstance(data, Store):
        return data.source_codes()
    if isinstance(data, torch.utils.data.Subset):
        codes, names = _source_labels(data.dataset)
        return codes[np.asarray(data.indices, dtype=np.int64)], names
    if isinstance(data, torch.utils.data.ConcatDataset):
        parts = [_source_labels(part) for part in data.datasets]
        names = sorted({n for _, part_names in parts for n in part_names})
        lookup = {n: i for i, n in enumerate(names)}
        merged = [np.asarray([lookup[n] for n in part_names], dtype=np.int64)[codes.astype(np.int64)]
                  for codes, part_names in parts if len(codes)]
        return (np.concatenate(merged) if merged else np.zeros(0, dtype=np.int64)), names
    if hasattr(data, "records"):  # ConformationDataset
        data = [r.source for r in data.records]
    labels = np.asarray(list(data), dtype=object)
    names, codes = np.unique(labels.astype(str), return_inverse=True) if labels.size else ([], labels)
    return np.asarray(codes, dtype=np.int64), [str(s) for s in names]


def node_of_shard(number: int, num_nodes: int) -> int:
    """The node that reads shard ``number`` (global over the training stores, in the order of
    ``data.train``) when ``data.node_local_shards`` is on: ``number mod num_nodes``."""
    return int(number) % int(num_nodes)


def stage_node_shards(stores: Sequence[str | Path], dest: str | Path, node: int, num_nodes: int,
                      progress: bool = False) -> dict:
    """Make node-local copies of the stores a node reads with ``data.node_local_shards``.

    For each store (in the order of ``data.train``) ``dest/<store name>`` gets the manifest, a
    copy of every shard this node reads (:func:`node_of_shard`) and a symbolic link to the
    original of every other shard (read only for the start-of-run statistics and validation).
    Copies go to a temporary name first and are renamed when complete; a shard already copied
    with the manifest's size is kept, so an interrupted staging is resumed by running it again.
    Point ``data.train`` at the staged directories. Returns counts of copied, kept and linked
    shards and the bytes copied. ``progress`` shows a bar of the bytes copied.
    """
    import shutil

    from tqdm.auto import tqdm

    dest = Path(dest)
    node, num_nodes = int(node), int(num_nodes)
    if num_nodes < 1 or not 0 <= node < num_nodes:
        raise DataError(f"node {node} is not in 0..{num_nodes - 1}")
    out = {"copied": 0, "kept": 0, "linked": 0, "bytes_copied": 0, "stores": []}
    offset = 0
    names = [Path(s).resolve().name for s in stores]
    if len(set(names)) != len(names):
        raise DataError(f"the stores {list(map(str, stores))} do not have distinct directory names")
    bar = tqdm(total=0, unit="B", unit_scale=True, desc=f"staging node {node}'s shards", disable=not progress)
    for src in stores:
        src = Path(src).resolve()
        manifest = read_manifest(src)
        target = dest / src.name
        target.mkdir(parents=True, exist_ok=True)
        for k, entry in enumerate(manifest["shards"]):
            final = target / entry["file"]
            original = src / entry["file"]
            if node_of_shard(offset + k, num_nodes) != node:
                if not (final.is_symlink() and final.readlink() == original):
                    if final.exists() or final.is_symlink():
                        final.unlink()  # a copy from another node count, or a link to a moved store
                    final.symlink_to(original)
                out["linked"] += 1
                continue
            if final.is_file() and not final.is_symlink() and final.stat().st_size == original.stat().st_size:
                out["kept"] += 1
                continue
            if final.is_symlink():
                final.unlink()
            tmp = final.with_name(f".{final.name}.part")
            size = original.stat().st_size
            bar.total += size
            shutil.copyfile(original, tmp)
            os.replace(tmp, final)
            bar.update(size)
            out["copied"] += 1
            out["bytes_copied"] += size
        offset += len(manifest["shards"])
        shutil.copyfile(src / MANIFEST, target / f".{MANIFEST}.part")
        os.replace(target / f".{MANIFEST}.part", target / MANIFEST)
        out["stores"].append(str(target))
    bar.close()
    return out


class WeightedSourceSampler(torch.utils.data.Sampler[int]):
    """Draw dataset indices so that each source's share of the draws follows ``weights``.

    Each epoch draws ``num_samples`` indices: source ``s`` gets ``w_s / sum(w)`` of them
    (exactly, up to rounding), and within a source the conformations are taken in a random
    order without repetition until the source is exhausted, then again in a new order. The
    order of all draws is shuffled. Sources missing from ``weights`` are not drawn.

    The sequence depends only on ``seed`` and the epoch (:meth:`set_epoch`). With
    ``num_replicas > 1`` (distributed training) each rank gets every ``num_replicas``-th draw
    of the same sequence; the draws are padded (by repeating the first ones) so every rank gets
    ``ceil(num_samples / num_replicas)``, or with ``drop_last=True`` the last
    ``num_samples % num_replicas`` draws are left out so every rank gets
    ``num_samples // num_replicas`` and no draw is repeated for padding.

    Args:
        data: a :class:`Store`, a ``Subset`` of one, a ``ConformationDataset`` or a sequence
            of per-item source names.
        weights: relative weight per source name.
        num_samples: draws per epoch (all replicas together); default the dataset length.
        seed: random seed.
        num_replicas, rank: the world size and this process's rank (distributed training).
        drop_last: leave out the remainder instead of padding (see above).
    """

    def __init__(
        self,
        data: Any,
        weights: Mapping[str, float],
        num_samples: int | None = None,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        codes, names = _source_labels(data)
        self.names = names
        if num_samples is None:
            num_samples = int(codes.shape[0])
        if int(num_samples) < 1:
            raise DataError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < num_replicas:
            raise DataError(f"rank {rank} is not in 0..{num_replicas - 1}")
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
        sizes = {name: int(bounds[s + 1] - bounds[s]) for s, name in enumerate(names)}
        unknown = sorted(k for k, v in weights.items() if not sizes.get(k) and v != 0)
        if unknown:
            present = sorted(k for k, v in sizes.items() if v)
            raise DataError(f"weights name sources {unknown} that are not in the data (it has {present})")
        idx_dtype = np.int32 if codes.shape[0] < 2**31 else np.int64
        self._members: dict[str, np.ndarray] = {}
        w = []
        for name, wt in weights.items():
            wt = float(wt)
            if not math.isfinite(wt) or wt < 0:
                raise DataError(f"weight of source {name!r} must be finite and >= 0, got {wt}")
        for s, name in enumerate(names):
            wt = float(weights.get(name, 0.0))
            if wt > 0 and sizes[name]:
                self._members[name] = order[bounds[s] : bounds[s + 1]].astype(idx_dtype)
                w.append(wt)
        if not w:
            raise DataError("all source weights are zero")
        self.sources = list(self._members)
        self.probabilities = np.asarray(w) / np.sum(w)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.num_replicas:
            raise DataError(f"{self.num_samples} draws cannot be shared between {self.num_replicas} replicas")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return -(-self.num_samples // self.num_replicas)

    def _counts(self, rng: np.random.Generator) -> np.ndarray:
        """Draws per source: largest-remainder rounding of ``p * num_samples``."""
        exact = self.probabilities * self.num_samples
        counts = np.floor(exact).astype(np.int64)
        short = self.num_samples - int(counts.sum())
        if short:
            frac = exact - counts
            # ties broken at random so no source is favoured systematically
            order = np.lexsort((rng.random(frac.shape[0]), -frac))
            counts[order[:short]] += 1
        return counts

    def indices(self) -> np.ndarray:
        """All draws of the current epoch (before splitting between replicas)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        counts = self._counts(rng)
        parts = []
        for name, k in zip(self.sources, counts):
            members = self._members[name]
            if k == 0:
                continue
            reps = -(-int(k) // members.shape[0])
            chunk = np.concatenate([rng.permutation(members) for _ in range(reps)])[:k]
            parts.append(chunk)
        out = np.concatenate(parts).astype(np.int64)
        rng.shuffle(out)
        total = len(self) * self.num_replicas
        if total > out.shape[0]:  # pad so every replica gets the same number of draws
            out = np.concatenate([out, out[: total - out.shape[0]]])
        return out[:total]

    def __iter__(self) -> Iterator[int]:
        return map(int, self.indices()[self.rank :: self.num_replicas])  # no 15 M-int list
