"""The sharded HDF5 conformation store: round trip, crash safety, resume, lazy reading, sampling."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from forcecentric.data import Conformation
from forcecentric.data.build import build_store
from forcecentric.data.dataset import collate
from forcecentric.data.store import (
    Store,
    StoreWriter,
    WeightedSourceSampler,
    content_hash,
    shard_name,
)
from forcecentric.errors import DataError

SOURCES = ("ani", "spice", "md17")


def make_conf(i: int, rng: np.random.Generator | None = None) -> Conformation:
    """A valid random conformation; record ``i`` decides which labels and flags it has."""
    rng = rng or np.random.default_rng(i)
    n = int(rng.integers(3, 12))
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    pos = grid * 1.3 + rng.uniform(-0.2, 0.2, size=(n, 3)) + 100.0 * rng.random()
    return Conformation(
        z=rng.choice([1, 6, 7, 8, 16], size=n),
        pos=pos,
        energy=None if i % 7 == 3 else float(-100.0 * n + rng.normal()),
        forces=None if i % 5 == 2 else rng.normal(size=(n, 3)),
        charge=int(i % 3) - 1,
        equilibrium=(i % 4 == 0),
        source=SOURCES[i % 3],
        level_of_theory="ωB97X/6-31G*" if i % 2 else "GFN2-xTB",
        mol_id=f"mol-{i // 4}",
    )


def assert_same(a: Conformation, b: Conformation) -> None:
    np.testing.assert_array_equal(a.z, b.z)
    np.testing.assert_allclose(a.pos, b.pos, rtol=0, atol=1e-4)  # float32 of values up to ~100 A
    np.testing.assert_array_equal(b.pos, a.pos.astype(np.float32).astype(np.float64))
    assert (a.energy is None) == (b.energy is None)
    if a.energy is not None:
        assert b.energy == a.energy  # float64: exact
    assert (a.forces is None) == (b.forces is None)
    if a.forces is not None:
        np.testing.assert_array_equal(b.forces, a.forces.astype(np.float32).astype(np.float64))
    assert (a.charge, a.equilibrium, a.source, a.level_of_theory, a.mol_id) == (
        b.charge, b.equilibrium, b.source, b.level_of_theory, b.mol_id)


def write(path, records, shard_size=10, **kw):
    with StoreWriter(path, shard_size=shard_size, **kw) as w:
        for r in records:
            w.add(r)
    return path


@pytest.mark.parametrize("cache_mb, preload", [(64, None), (0, 2), (0.001, 2)])
def test_round_trip_across_shards(tmp_path, monkeypatch, cache_mb, preload):
    """Records read back equal, whether per-record arrays are cached in memory or read from disk."""
    from forcecentric.data import store as store_mod

    if preload is not None:  # string tables read string by string from the file
        monkeypatch.setattr(store_mod, "_VOCAB_PRELOAD", preload)
    records = [make_conf(i) for i in range(53)]
    store = Store(write(tmp_path / "s", records, shard_size=10), cache_mb=cache_mb)
    assert len(store) == 53 and store.n_shards == 6
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*.h5")) == [shard_name(k) for k in range(6)]
    for i, r in enumerate(records):
        assert_same(r, store[i])
    assert_same(records[-1], store[-1])
    assert_same(records[10], store[np.int64(10)])  # first record of the second shard
    with pytest.raises(IndexError):
        store[53]
    m = store.manifest
    assert [s["n_conformations"] for s in m["shards"]] == [10, 10, 10, 10, 10, 3]
    assert m["shards"][0]["n_atoms"] == sum(r.n_atoms for r in records[:10])
    assert m["complete"] and m["format_version"] == 1
    assert m["sources"] == {"ani": 18, "spice": 18, "md17": 17}
    assert list(store.mol_ids()) == [r.mol_id for r in records]
    assert content_hash(store[5].z, store[5].pos, store[5].charge) == store.hashes()[5].astype("<u8").tobytes()
    sub = store.subset([3, 40])
    assert len(sub) == 2 and sub[1].mol_id == records[40].mol_id
    store.verify()
    cached = [k for k, m in store._meta.items() if m is not None]
    assert cached == ({64: list(range(6)), 0: [], 0.001: [0, 1]}[cache_mb])


def test_statistics_hand_made(tmp_path):
    recs = [
        Conformation(z=[8, 1, 1], pos=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], energy=-12.0,
                     forces=[[1, 0, 0], [0, 2, 0], [0, 0, 2]], source="a", level_of_theory="L1"),
        Conformation(z=[6, 1], pos=[[0, 0, 0], [1.1, 0, 0]], energy=-4.0,
                     forces=[[3, 0, 0], [0, 0, 0]], source="b", level_of_theory="L1"),
        # equilibrium: its forces do not count in the force RMS; no energy
        Conformation(z=[6, 6], pos=[[0, 0, 0], [1.5, 0, 0]], forces=[[9, 9, 9], [9, 9, 9]],
                     equilibrium=True, source="a", level_of_theory="L2"),
    ]
    st = Store(write(tmp_path / "s", recs, shard_size=2)).statistics()
    assert st["n_conformations"] == 3 and st["n_atoms"] == 7 and st["max_atoms"] == 3
    assert st["elements"] == {"1": 3, "6": 3, "8": 1}
    assert (st["n_equilibrium"], st["n_off_equilibrium"]) == (1, 2)
    assert (st["n_with_forces"], st["n_with_energy"]) == (3, 2)
    # components of the two off-equilibrium records: 1, 4, 4, 9 squared; 15 components
    assert st["force_rms"] == pytest.approx(math.sqrt((1 + 4 + 4 + 9) / 15))
    assert st["mean_energy_per_atom"] == pytest.approx((-4.0 + -2.0) / 2)
    assert st["std_energy_per_atom"] == pytest.approx(1.0)
    assert st["sources"] == {"a": 2, "b": 1}
    assert st["levels_of_theory"] == {"L1": 2, "L2": 1}


def test_writer_killed_without_close_resumes_without_duplicates(tmp_path):
    path = tmp_path / "s"
    records = [make_conf(i) for i in range(25)]
    w = StoreWriter(path, shard_size=10, dedup=True)
    for i, r in enumerate(records):
        w.add(r)
        w.set_consumed("input", i + 1)
    del w  # "killed": never closed
    files = sorted(p.name for p in path.iterdir())
    assert files == ["manifest.json", shard_name(0), shard_name(1)]
    with pytest.raises(DataError, match="incomplete"):
        Store(path)
    with pytest.warns(UserWarning):
        partial = Store(path, allow_incomplete=True)
    assert len(partial) == 20

    w = StoreWriter(path, shard_size=10, dedup=True, resume=True)
    start = w.consumed("input")
    assert start == 20
    for i in range(start - 3, 25):  # re-feeding a few already stored records: dedup drops them
        added = w.add(records[i])
        assert added == (i >= start)
        w.set_consumed("input", i + 1)
    w.close()
    store = Store(path)
    assert len(store) == 25
    for i, r in enumerate(records):
        assert_same(r, store[i])
    with pytest.raises(DataError, match="already exists"):
        StoreWriter(path)
    write(path, records[:4], overwrite=True)
    assert len(Store(path)) == 4


class Boom(Exception):
    pass


def _records_with_problems(n: int):
    """Good records plus, at fixed places, a NaN, a too-close pair and a duplicate."""
    out = []
    for i in range(n):
        c = make_conf(i)
        if i == 5:
            c.forces = c.forces if c.forces is not None else np.zeros((c.n_atoms, 3))
            c.forces[0, 1] = np.nan
        if i == 17:
            c.pos[1] = c.pos[0] + [0.03, 0, 0]
        if i == 31:
            c = make_conf(2)
        out.append(c)
    return out


def _reader(records, fail_at=None):
    def reader(path):
        for i, r in enumerate(records):
            if fail_at is not None and i == fail_at:
                raise Boom("killed")
            yield r
    return reader


def test_build_killed_midway_resumes_to_the_same_store(tmp_path, monkeypatch):
    records = _records_with_problems(60)
    clean = build_store(["in.xyz"], tmp_path / "clean", reader=_reader(records), shard_size=8,
                        progress=False)
    assert clean["n_kept"] == 57 and clean["n_dropped"] == 3

    out = tmp_path / "killed"
    with pytest.raises(Boom):
        build_store(["in.xyz"], out, reader=_reader(records, fail_at=45), shard_size=8, progress=False)
    # the unfinished shard was never written under a shard name; manifest lists what exists
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and m["n_shards"] >= 1
    assert sorted(p.name for p in out.glob("shard-*.h5")) == [s["file"] for s in m["shards"]]

    # a second crash, this time while a shard is being renamed: a .tmp file is left behind
    from forcecentric.data import store as store_mod

    def crash(self, tmp, final):
        raise Boom("killed during rename")

    monkeypatch.setattr(store_mod.StoreWriter, "_commit_shard", crash)
    with pytest.raises(Boom):
        build_store(["in.xyz"], out, reader=_reader(records), shard_size=8, progress=False, resume=True)
    assert list(out.glob(".shard-*.h5.tmp"))
    with pytest.warns(UserWarning):
        assert len(Store(out, allow_incomplete=True)) == 8 * m["n_shards"]
    monkeypatch.undo()

    report = build_store(["in.xyz"], out, reader=_reader(records), shard_size=8, progress=False, resume=True)
    assert report["resumed"] and not list(out.glob("*.tmp"))
    a, b = Store(tmp_path / "clean"), Store(out)
    assert len(a) == len(b) == 57
    np.testing.assert_array_equal(a.hashes(), b.hashes())
    assert len({bytes(h) for h in b.hashes()}) == 57
    for key in ("n_read", "n_kept", "n_dropped", "dropped_by_reason", "dropped"):
        assert report[key] == clean[key], key
    assert (out / "dropped.csv").read_text() == (tmp_path / "clean" / "dropped.csv").read_text()
    assert a.statistics() == b.statistics()


def test_build_select_and_exclude_resume_and_refuse_other_choices(tmp_path):
    records = _records_with_problems(40)
    for i, r in enumerate(records):
        r.info["sampling"] = "normal_mode" if i % 3 == 0 else "md"
    clean = build_store(["in.xyz"], tmp_path / "clean", reader=_reader(records), shard_size=8, progress=False,
                        exclude={"sampling": "normal_mode"})
    n_nm = sum(r.info["sampling"] == "normal_mode" for r in records)
    # the three problem records (5: NaN, 17: atoms too close, 31: duplicate of 2) are md frames:
    # checked and dropped as before; the normal-mode ones are not checked, only counted
    assert clean["n_not_selected"] == n_nm and clean["n_read"] == 40
    assert clean["n_kept"] == 40 - n_nm - 3 and clean["n_dropped"] == 3
    assert clean["dropped_by_reason"] == {"atoms_too_close": 1, "duplicate": 1, "nan_or_inf": 1}
    out = tmp_path / "killed"
    with pytest.raises(Boom):
        build_store(["in.xyz"], out, reader=_reader(records, fail_at=30), shard_size=8, progress=False,
                    exclude={"sampling": "normal_mode"})
    with pytest.raises(DataError, match="cannot resume with different options"):
        build_store(["in.xyz"], out, reader=_reader(records), shard_size=8, progress=False, resume=True)
    report = build_store(["in.xyz"], out, reader=_reader(records), shard_size=8, progress=False, resume=True,
                         exclude={"sampling": "normal_mode"})
    assert report["resumed"]
    for key in ("n_read", "n_kept", "n_dropped", "n_not_selected"):
        assert report[key] == clean[key], key
    np.testing.assert_array_equal(Store(out).hashes(), Store(tmp_path / "clean").hashes())
    selected = build_store(["in.xyz"], tmp_path / "sel", reader=_reader(records), progress=False,
                           select={"sampling": "normal_mode"})
    assert selected["n_kept"] == n_nm and selected["n_not_selected"] == 40 - n_nm
    with pytest.raises(DataError, match="select must map"):
        build_store(["in.xyz"], tmp_path / "x", reader=_reader(records), progress=False, select=["sampling"])


def test_build_store_drops_and_reports(tmp_path):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for i, c in enumerate(_records_with_problems(12) + [make_conf(7)]):
        a = Atoms(numbers=c.z, positions=c.pos)
        forces = c.forces if c.forces is not None else np.zeros((c.n_atoms, 3))
        if i == 9:
            forces = forces + 50.0  # over the force bound
        a.calc = SinglePointCalculator(a, energy=c.energy if c.energy is not None else 0.0, forces=forces)
        a.info.update(mol_id=c.mol_id, source="test")
        frames.append(a)
    path = tmp_path / "in.extxyz"
    ase.io.write(path, frames, format="extxyz")
    too_close = make_conf(17, None)
    too_close.pos[1] = too_close.pos[0] + [0.03, 0, 0]
    ase.io.write(tmp_path / "b.extxyz", [Atoms(numbers=too_close.z, positions=too_close.pos)], format="extxyz")

    out = tmp_path / "store"
    rep = build_store([path, tmp_path / "b.extxyz", tmp_path / "missing.xyz"], out, max_force=20.0,
                      progress=False)
    by = {(d["file"], d["record"]): d for d in rep["dropped"]}
    assert by[(str(path), 5)]["category"] == "nan_or_inf"
    assert "forces contain NaN" in by[(str(path), 5)]["reason"]
    assert by[(str(path), 9)]["category"] == "force_bound"
    assert by[(str(path), 12)]["category"] == "duplicate"
    assert by[(str(tmp_path / "b.extxyz"), 0)]["category"] == "atoms_too_close"
    assert "closer than 0.1" in by[(str(tmp_path / "b.extxyz"), 0)]["reason"]
    assert rep["dropped_by_reason"] == {"atoms_too_close": 1, "duplicate": 1, "force_bound": 1, "nan_or_inf": 1}
    assert rep["n_read"] == 14 and rep["n_kept"] == 10 and rep["n_dropped"] == 4
    assert [e["file"] for e in rep["errors"]] == [str(tmp_path / "missing.xyz")]
    assert not rep["complete"]
    on_disk = json.loads((out / "build_report.json").read_text())
    assert on_disk["dropped"] == rep["dropped"]
    with open(out / "dropped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["file"], int(r["record"]), r["category"]) for r in rows} == {
        (d["file"], d["record"], d["category"]) for d in rep["dropped"]}
    store = Store(out)
    assert len(store) == 10 and store.statistics()["sources"] == {"test": 10}


def test_truncated_or_corrupted_shard_names_the_file(tmp_path):
    path = write(tmp_path / "s", [make_conf(i) for i in range(30)], shard_size=10)
    shard = path / shard_name(1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    store = Store(path)
    assert store[3].n_atoms > 0  # other shards still read
    with pytest.raises(DataError, match="shard-00001.h5") as info:
        store[15]
    assert info.value.file == str(shard)
    # same size, garbage header: the HDF5 open fails and the error still names the shard
    shard.write_bytes(b"\0" * 64 + data[64:])
    with pytest.raises(DataError, match="shard-00001.h5"):
        Store(path)[12]
    with pytest.raises(DataError, match="shard-00001.h5"):
        Store(path).verify()


def test_bad_shards_can_be_skipped_by_option(tmp_path):
    path = write(tmp_path / "s", [make_conf(i) for i in range(40)], shard_size=10)
    intact = Store(path)
    recs = [intact[j] for j in range(40)]
    intact.close()
    (path / shard_name(1)).write_bytes((path / shard_name(1)).read_bytes()[:500])  # truncated
    data = (path / shard_name(3)).read_bytes()
    (path / shard_name(3)).write_bytes(b"\0" * 64 + data[64:])  # corrupted header, same size
    with pytest.warns(UserWarning) as warned:
        store = Store(path, skip_bad_shards=True)
    assert [w for w in warned if "shard-00001.h5" in str(w.message)]
    assert [w for w in warned if "shard-00003.h5" in str(w.message)]
    assert [s["file"] for s in store.skipped_shards] == [shard_name(1), shard_name(3)]
    assert len(store) == 20
    for i, j in enumerate(list(range(0, 10)) + list(range(20, 30))):  # shards 0 and 2, in order
        assert_same(store[i], recs[j])
    assert len(store.sources()) == 20 and store.describe()["skipped_shards"][0]["n_conformations"] == 10
    # the data module passes the option through (data.skip_bad_shards)
    from forcecentric.config import DataConfig
    from forcecentric.train.datamodule import ForceFieldDataModule

    dm = ForceFieldDataModule(DataConfig(train=[str(path)], n_val=5, skip_bad_shards=True))
    with pytest.warns(UserWarning, match="skipping shard"):
        dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 20


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from forcecentric.checkpoint import atomic_torch_save

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before and torch.load(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


class _PidProbe(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        self.store[i]
        return self.store._pid, os.getpid()


def test_dataloader_with_two_workers_matches_direct_indexing(tmp_path):
    records = [make_conf(i) for i in range(45)]
    store = Store(write(tmp_path / "s", records, shard_size=16))
    store[0], store[40]  # handles opened in the parent before the fork must not leak into workers
    store2 = pickle.loads(pickle.dumps(store))
    assert_same(records[20], store2[20])
    loader = torch.utils.data.DataLoader(store, batch_size=7, shuffle=False, num_workers=2,
                                         collate_fn=collate, persistent_workers=False)
    batches = list(loader)
    assert len(batches) == 7
    for k, b in enumerate(batches):
        ref = collate([store[i] for i in range(7 * k, min(7 * k + 7, 45))])
        for name in ("z", "pos", "forces", "energy", "has_energy", "has_forces", "equilibrium", "charge", "batch"):
            assert torch.equal(getattr(b, name).nan_to_num(), getattr(ref, name).nan_to_num()), name
    # each worker opened its own handles (the parent's were not reused after the fork)
    probe = torch.utils.data.DataLoader(_PidProbe(store), batch_size=None, num_workers=2)
    pids = list(probe)
    assert all(a == b != os.getpid() for a, b in pids) and len({b for _, b in pids}) == 2


def test_weighted_source_sampler_follows_weights_and_seed(tmp_path):
    labels = ["a"] * 1000 + ["b"] * 200 + ["c"] * 50 + ["d"] * 30
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    s = WeightedSourceSampler(labels, weights, num_samples=20_000, seed=3)
    draws = np.fromiter(iter(s), dtype=np.int64)
    assert len(draws) == len(s) == 20_000
    share = {k: np.mean([labels[i] == k for i in draws]) for k in "abcd"}
    assert share["a"] == pytest.approx(0.25, abs=0.02)
    assert share["b"] == pytest.approx(0.25, abs=0.02)
    assert share["c"] == pytest.approx(0.50, abs=0.02)
    assert share["d"] == 0.0
    # within a source, every member is drawn before any repeats (b: 5000 draws over 200 items)
    b_draws = np.bincount(draws[np.isin(draws, np.arange(1000, 1200))] - 1000, minlength=200)
    assert b_draws.min() == b_draws.max() == 25
    again = list(WeightedSourceSampler(labels, weights, num_samples=20_000, seed=3))
    assert again == draws.tolist()
    assert list(WeightedSourceSampler(labels, weights, num_samples=20_000, seed=4)) != again
    s.set_epoch(1)
    assert list(s) != again
    # distributed: the replicas partition one epoch's draws
    r0 = list(WeightedSourceSampler(labels, weights, 1001, seed=3, num_replicas=2, rank=0))
    r1 = list(WeightedSourceSampler(labels, weights, 1001, seed=3, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 501
    with pytest.raises(DataError, match="not in the data"):
        WeightedSourceSampler(labels, {"x": 1.0})

    # over a Store (and a Subset of one), indices map to the right sources
    records = [make_conf(i) for i in range(60)]
    store = Store(write(tmp_path / "s", records, shard_size=25))
    ws = WeightedSourceSampler(store, {"ani": 3, "md17": 1}, num_samples=400, seed=0)
    got = [records[i].source for i in ws]
    assert got.count("ani") == 300 and got.count("md17") == 100
    sub = store.subset(range(30, 60))
    ws = WeightedSourceSampler(sub, {"spice": 1}, num_samples=50, seed=0)
    assert {sub[i].source for i in ws} == {"spice"}


def test_writer_checks_and_resume_guards(tmp_path):
    path = tmp_path / "s"
    w = StoreWriter(path, shard_size=4)
    bad = make_conf(1)
    bad.forces = np.full_like(bad.pos, np.inf)
    with pytest.raises(DataError, match="forces contain NaN or Inf"):
        w.add(bad)
    with pytest.raises(DataError, match="int16"):
        w.add(Conformation(z=[1, 1], pos=[[0, 0, 0], [0.8, 0, 0]], charge=40_000))
    assert w.add(make_conf(1)) and w.add(make_conf(1))  # no dedup: both kept
    w.close()
    assert len(Store(path)) == 2

    records = [make_conf(i) for i in range(12)]
    out = tmp_path / "b"
    build_store(["x"], out, reader=_reader(records), shard_size=4, progress=False)
    with pytest.raises(DataError, match="already exists"):
        build_store(["x"], out, reader=_reader(records), shard_size=4, progress=False)
    with pytest.raises(DataError, match="different options"):
        build_store(["x"], out, reader=_reader(records), shard_size=4, progress=False, resume=True,
                    min_distance=0.5)
    # resuming a finished build with one more input only adds that input
    more = [make_conf(i) for i in range(100, 105)]
    rep = build_store(["x", "y"], out, reader=lambda p: iter(records if p == "x" else more),
                      shard_size=4, progress=False, resume=True)
    assert rep["n_kept"] == 17 and len(Store(out)) == 17
    # an input that changed on disk since it was consumed cannot be resumed
    f = tmp_path / "in.extxyz"
    f.write_text("")
    build_store([f], tmp_path / "c", reader=_reader(records), progress=False)
    f.write_text("changed")
    with pytest.raises(DataError, match="input changed"):
        build_store([f], tmp_path / "c", reader=_reader(records), progress=False, resume=True)


def test_weighted_sampler_over_concatenated_stores_and_files(tmp_path):
    """The source labels of a training set made of several stores and a data file (a Subset of
    their ConcatDataset, as the datamodule builds it) come from the stores' index codes and
    match every record's own source; the weighted sampler keeps the asked shares."""
    import ase.io

    from forcecentric.data import read_all
    from forcecentric.data.dataset import ConformationDataset
    from forcecentric.data.store import _source_labels

    from conftest import morse_frames

    def frames(n, source, seed):
        out = morse_frames(n, seed=seed)
        for a in out:
            a.info["source"] = source
        return out

    ase.io.write(tmp_path / "a.extxyz", frames(20, "ani", 0), format="extxyz")
    ase.io.write(tmp_path / "b.extxyz", frames(10, "spice", 1), format="extxyz")
    ase.io.write(tmp_path / "c.extxyz", frames(10, "md", 2), format="extxyz")
    build_store([tmp_path / "a.extxyz"], tmp_path / "A", shard_size=7, progress=False)
    build_store([tmp_path / "b.extxyz"], tmp_path / "B", shard_size=7, progress=False)
    pool = torch.utils.data.ConcatDataset([Store(tmp_path / "A"), Store(tmp_path / "B"),
                                           ConformationDataset(read_all(tmp_path / "c.extxyz"))])
    idx = np.random.default_rng(0).permutation(len(pool))[:33]
    train = torch.utils.data.Subset(pool, idx)
    codes, names = _source_labels(train)
    assert names == ["ani", "md", "spice"]
    assert [names[k] for k in codes] == [train[i].source for i in range(len(train))]
    sampler = WeightedSourceSampler(train, {"ani": 1.0, "md": 1.0}, num_samples=40, seed=0)
    drawn = [names[codes[i]] for i in sampler]
    assert drawn.count("ani") == drawn.count("md") == 20 and "spice" not in drawn
