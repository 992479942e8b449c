"""Conformation-store benchmark: build and read throughput, bytes per conformation, peak memory.

For each size, a synthetic corpus (random small molecules of 9-30 atoms, ten conformations each,
one equilibrium and nine displaced, with energies and forces, from three sources) is built with
:func:`forcecentric.data.build.build_store` (full path: validation, content hashing, dedup,
sharding) and then read back through a ``DataLoader`` (2 workers, shuffled, ``collate``).
Building and reading each run in a fresh subprocess so their peak RSS is measured separately;
reading reports the main process and the largest worker. Memory should not grow with the store.

    python benchmarks/store_benchmark.py --sizes 20000 100000
    python benchmarks/store_benchmark.py --sizes 100000 1000000 --read-limit 200000

A third phase reads the store through the training data path (datamodule split, start-of-run
statistics, the training sampler and loader) and records its set-up time and memory.

Writes ``benchmarks/results/store.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from forcecentric.provenance import machine_info

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = np.array([1, 6, 7, 8, 9, 16, 17])
ELEMENT_P = np.array([0.50, 0.30, 0.08, 0.08, 0.02, 0.01, 0.01])
ATOMREF = {1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0, 9: -2713.0, 16: -10830.0, 17: -12577.0}
SOURCES = ["ani", "spice", "md"]
SOURCE_P = [0.6, 0.3, 0.1]
CONFS_PER_MOLECULE = 10


def synthetic(n: int, seed: int = 0):
    """Yield ``n`` synthetic conformations (valid: atoms >= ~0.9 A apart)."""
    from forcecentric.data import Conformation

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3), np.arange(4), indexing="ij"), -1).reshape(-1, 3)
    made = 0
    mol = 0
    while made < n:
        k = int(rng.integers(9, 31))
        z = rng.choice(ELEMENTS, size=k, p=ELEMENT_P)
        base = grid[rng.choice(grid.shape[0], size=k, replace=False)] * 1.4 + rng.uniform(-0.1, 0.1, (k, 3))
        e0 = float(sum(ATOMREF[int(x)] for x in z))
        source = SOURCES[int(rng.choice(3, p=SOURCE_P))]
        for c in range(min(CONFS_PER_MOLECULE, n - made)):
            eq = c == 0
            disp = 0.0 if eq else rng.normal(scale=0.05, size=(k, 3)).clip(-0.2, 0.2)
            yield Conformation(
                z=z,
                pos=base + disp,
                energy=e0 + float(rng.normal(scale=0.5)),
                forces=rng.normal(scale=0.02 if eq else 1.0, size=(k, 3)),
                equilibrium=eq,
                source=source,
                level_of_theory="GFN2-xTB" if source == "md" else "wB97X/6-31G*",
                mol_id=f"mol{mol}",
            )
            made += 1
        mol += 1


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _peak_kb(who=resource.RUSAGE_SELF) -> int:
    return int(resource.getrusage(who).ru_maxrss)  # kB on Linux


# ------------------------------------------------------------------------------- subprocesses
def run_build(n: int, out: str, shard_size: int) -> dict:
    from forcecentric.data.build import build_store

    baseline = _rss_kb()
    # generation alone (to separate the store's cost from the synthetic data's)
    probe = min(n, 20_000)
    t = time.perf_counter()
    for _ in synthetic(probe, seed=1):
        pass
    gen_rate = probe / (time.perf_counter() - t)
    t = time.perf_counter()
    report = build_store([f"synthetic-{n}"], out, reader=lambda _: synthetic(n), shard_size=shard_size,
                         progress=False, dedup=True)
    elapsed = time.perf_counter() - t
    store_time = max(elapsed - n / gen_rate, 1e-9)
    return {
        "n_conformations": report["n_conformations"],
        "n_dropped": report["n_dropped"],
        "n_shards": report["n_shards"],
        "bytes": report["bytes"],
        "bytes_per_conformation": report["bytes"] / max(report["n_conformations"], 1),
        "bytes_per_atom": report["bytes"] / max(report["statistics"]["n_atoms"], 1),
        "mean_atoms": report["statistics"]["mean_atoms"],
        "build_seconds": elapsed,
        "build_conformations_per_s": n / elapsed,
        "generation_conformations_per_s": gen_rate,
        "build_conformations_per_s_excluding_generation": n / store_time,
        "build_rss_baseline_mb": baseline / 1024,
        "build_peak_rss_mb": _peak_kb() / 1024,
    }


def run_read(path: str, limit: int, batch_size: int, workers: int, cache_mb: float) -> dict:
    import torch

    from forcecentric.data.dataset import collate
    from forcecentric.data.store import Store

    torch.set_num_threads(1)
    baseline = _rss_kb()
    # single process, random access, no DataLoader: first without any in-memory cache
    # (everything read from the files), then with the per-record arrays cached
    uncached = Store(path, cache_mb=0)
    n = min(limit, len(uncached))
    idx = np.random.default_rng(0).integers(0, len(uncached), size=min(n, 20_000))
    t = time.perf_counter()
    for i in idx:
        uncached[int(i)]
    direct_uncached = len(idx) / (time.perf_counter() - t)
    uncached.close()
    rss_uncached = _peak_kb()
    store = Store(path, cache_mb=cache_mb)
    t = time.perf_counter()
    for i in idx:
        store[int(i)]
    direct = len(idx) / (time.perf_counter() - t)
    cached_mb = store._meta_bytes / 2**20
    store.close()

    g = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(store, num_samples=n, generator=g)
    loader = torch.utils.data.DataLoader(store, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=collate, persistent_workers=False, prefetch_factor=4)
    t = time.perf_counter()
    seen = atoms = 0
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t
        seen += batch.n_graphs
        atoms += int(batch.z.shape[0])
    elapsed = time.perf_counter() - t
    del loader
    return {
        "read_conformations": seen,
        "read_seconds": elapsed,
        "read_conformations_per_s": seen / elapsed,
        "read_atoms_per_s": atoms / elapsed,
        "read_first_batch_s": first,
        "direct_getitem_per_s_single_process": direct,
        "direct_getitem_per_s_single_process_cache_mb_0": direct_uncached,
        "cached_per_record_arrays_mb": cached_mb,
        "read_rss_baseline_mb": baseline / 1024,
        "read_peak_rss_cache_mb_0_mb": rss_uncached / 1024,
        "read_peak_rss_main_mb": _peak_kb() / 1024,
        "read_peak_rss_worker_mb": _peak_kb(resource.RUSAGE_CHILDREN) / 1024,
    }


def run_train_path(path: str, batches: int, batch_size: int, workers: int, world: int) -> dict:
    """The training data path of ``forcecentric pretrain`` on the store, without the model: the
    datamodule's split (1,000 validation, 1,000 test, the rest training), the start-of-run
    statistics sample and description, then ``batches`` batches of rank 0's training loader (an
    emulated ``world``-process run) with ``workers`` DataLoader workers."""
    from types import SimpleNamespace

    import torch

    from forcecentric.config import DataConfig
    from forcecentric.train.datamodule import ForceFieldDataModule, sample_records

    torch.set_num_threads(1)
    baseline = _rss_kb()
    cfg = DataConfig(train=[path], n_val=1000, n_test=1000, batch_size=batch_size, num_workers=workers)
    t = time.perf_counter()
    dm = ForceFieldDataModule(cfg, seed=0)
    dm.setup("fit")
    split_s = time.perf_counter() - t
    t = time.perf_counter()
    sample_records(dm.train_set, 20_000, 0)  # what run() reads for normalisation and reference fits
    dm.describe()
    stats_s = time.perf_counter() - t
    rss_setup = _rss_kb()
    dm.trainer = SimpleNamespace(world_size=world, global_rank=0, num_nodes=1, node_rank=0, local_rank=0)
    loader = dm.train_dataloader()
    t = time.perf_counter()
    seen = 0
    for k, batch in enumerate(loader):
        seen += batch.n_graphs
        if k + 1 >= batches:
            break
    elapsed = time.perf_counter() - t
    del loader
    return {
        "train_path_world": world,
        "train_path_training_conformations": len(dm.train_set),
        "train_path_split_s": split_s,
        "train_path_statistics_s": stats_s,
        "train_path_rss_after_setup_mb": rss_setup / 1024,
        "train_path_rss_setup_minus_baseline_mb": (rss_setup - baseline) / 1024,
        "train_path_conformations_per_s": seen / elapsed,
        "train_path_peak_rss_main_mb": _peak_kb() / 1024,
        "train_path_peak_rss_worker_mb": _peak_kb(resource.RUSAGE_CHILDREN) / 1024,
    }


def _subprocess(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--read-limit", type=int, default=200_000, help="conformations read per size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-mb", type=float, default=64.0, help="Store(cache_mb=...) for reading")
    p.add_argument("--workdir", default=None, help="where stores are built (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per build or read")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store.json"))
    p.add_argument("--train-batches", type=int, default=300,
                   help="batches read through the training data path (0: skip that phase)")
    p.add_argument("--train-world", type=int, default=1, help="processes the training-path phase emulates")
    p.add_argument("--_train", nargs=5, metavar=("DIR", "BATCHES", "BATCH", "WORKERS", "WORLD"), help=argparse.SUPPRESS)
    p.add_argument("--_build", nargs=3, metavar=("N", "DIR", "SHARD"), help=argparse.SUPPRESS)
    p.add_argument("--_read", nargs=5, metavar=("DIR", "LIMIT", "BATCH", "WORKERS", "CACHE"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._build:
        print(json.dumps(run_build(int(a._build[0]), a._build[1], int(a._build[2]))))
        return 0
    if a._train:
        print(json.dumps(run_train_path(a._train[0], *map(int, a._train[1:]))))
        return 0
    if a._read:
        print(json.dumps(run_read(a._read[0], int(a._read[1]), int(a._read[2]), int(a._read[3]),
                                  float(a._read[4]))))
        return 0

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="fc-store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in a.sizes:
            path = work / f"store-{n}"
            if path.exists():
                shutil.rmtree(path)
            print(f"[{n}] building ...", flush=True)
            b = _subprocess(["--_build", str(n), str(path), str(a.shard_size)], a.timeout)
            print(f"[{n}] {b['build_conformations_per_s']:.0f} conf/s, {b['bytes_per_conformation']:.0f} B/conf, "
                  f"peak RSS {b['build_peak_rss_mb']:.0f} MB; reading ...", flush=True)
            r = _subprocess(["--_read", str(path), str(a.read_limit), str(a.batch_size), str(a.workers),
                             str(a.cache_mb)], a.timeout)
            print(f"[{n}] read {r['read_conformations_per_s']:.0f} conf/s, peak RSS main "
                  f"{r['read_peak_rss_main_mb']:.0f} MB / worker {r['read_peak_rss_worker_mb']:.0f} MB", flush=True)
            tr = {}
            if a.train_batches:
                tr = _subprocess(["--_train", str(path), str(a.train_batches), str(a.batch_size), str(a.workers),
                                  str(a.train_world)], a.timeout)
                print(f"[{n}] training path: split {tr['train_path_split_s']:.1f} s, statistics "
                      f"{tr['train_path_statistics_s']:.1f} s, {tr['train_path_conformations_per_s']:.0f} conf/s, "
                      f"RSS after setup {tr['train_path_rss_after_setup_mb']:.0f} MB, peak main "
                      f"{tr['train_path_peak_rss_main_mb']:.0f} MB / worker {tr['train_path_peak_rss_worker_mb']:.0f} MB",
                      flush=True)
            results.append({"size": n, **b, **r, **tr})
            if not a.keep:
                shutil.rmtree(path)
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "benchmark": "conformation store (sharded HDF5)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {
            "sizes": a.sizes,
            "shard_size": a.shard_size,
            "read_limit": a.read_limit,
            "batch_size": a.batch_size,
            "workers": a.workers,
            "cache_mb": a.cache_mb,
            "data": "synthetic molecules of 9-30 atoms, 10 conformations each (1 equilibrium), energies "
                    "and forces, 3 sources; built with build_store (validation + hashing + dedup)",
            "read": "DataLoader, RandomSampler without replacement (read_limit draws), collate_fn=collate, "
                    "torch threads=1; direct_getitem_*: 20k random store[i] in one process",
            "rss": "peak RSS (ru_maxrss) of a fresh process; baseline = RSS after importing torch/h5py; "
                   "read_peak_rss_cache_mb_0_mb is measured before the cached pass",
            "train_path": "train_path_*: ForceFieldDataModule on the store (1000 val, 1000 test, rest train), "
                          "run()'s 20k-record statistics sample, then train_batches batches of rank 0's loader "
                          f"for an emulated {a.train_world}-process run, {a.workers} workers",
        },
        "results": results,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
