"""Multi-node data locality (data.node_local_shards): every node reads only its own shards of the
training stores, and ``forcecentric stage-shards`` copies exactly those to node-local disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from forcecentric.cli import main
from forcecentric.config import load_run_config
from forcecentric.data.build import build_store
from forcecentric.data.sampling import NodeLocalSampler
from forcecentric.data.store import Store, node_of_shard, stage_node_shards
from forcecentric.errors import ConfigError, DataError

from conftest import morse_frames


def _store(tmp_path: Path, name: str, n: int, shard_size: int, seed: int) -> Path:
    import ase.io

    src = tmp_path / f"{name}.extxyz"
    ase.io.write(src, morse_frames(n, seed=seed), format="extxyz")
    out = tmp_path / name
    build_store([src], out, shard_size=shard_size, progress=False)
    return out


def test_node_local_sampler_keeps_each_node_on_its_shards():
    shards = np.repeat(np.arange(7), [10, 10, 10, 10, 10, 10, 4])  # 7 shards, the last one short
    nodes, local = 2, 3
    owner = shards % nodes
    per_rank = min(np.bincount(owner)) // local  # node 0: shards 0,2,4,6 = 34; node 1: 30 -> 10 each
    assert per_rank == 10
    for epoch in (0, 1):
        seen = []
        for node in range(nodes):
            for lr in range(local):
                s = NodeLocalSampler(shards, nodes, node, local, lr, seed=2)
                s.set_epoch(epoch)
                idx = list(s)
                assert len(idx) == len(s) == per_rank
                assert set(shards[idx] % nodes) == {node}  # only this node's shards
                seen += idx
        assert len(seen) == len(set(seen)) == nodes * local * per_rank  # no item twice in an epoch
    a, b = NodeLocalSampler(shards, 2, 0, 3, 0, seed=2), NodeLocalSampler(shards, 2, 0, 3, 0, seed=2)
    b.set_epoch(1)
    assert list(a) != list(b)  # a new order (and a different left-out surplus) every epoch
    with pytest.raises(DataError, match="too few shards"):
        NodeLocalSampler(np.zeros(50, dtype=int), 2, 0, 1, 0)  # one shard cannot feed two nodes


def test_datamodule_gives_every_rank_of_a_node_that_nodes_shards(tmp_path):
    from forcecentric.train.datamodule import ForceFieldDataModule

    a = _store(tmp_path, "a", 30, 6, seed=0)  # 5 shards
    b = _store(tmp_path, "b", 24, 6, seed=1)  # 4 shards: numbered 5..8 after a's
    cfg = load_run_config(None, {"data.train": [str(a), str(b)], "data.n_val": 4, "data.n_test": 0,
                                 "data.batch_size": 2, "data.node_local_shards": True}).data
    keys = np.concatenate([Store(a).shard_numbers(), Store(b).shard_numbers() + 5])
    seen = []
    for rank in range(4):  # 2 nodes x 2 processes
        dm = ForceFieldDataModule(cfg, seed=0)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=4, global_rank=rank, num_nodes=2, node_rank=rank // 2,
                                     local_rank=rank % 2)
        sampler = dm.train_dataloader().sampler
        pool = [dm.train_set.indices[i] for i in sampler]
        assert {int(keys[i]) % 2 for i in pool} == {rank // 2}, rank
        seen += pool
    assert len(seen) == len(set(seen))
    # weights per source and node-local shards do not mix; a data file has no shards
    dm = ForceFieldDataModule(cfg.model_copy(update={"source_weights": {"morse-test": 1.0}}), seed=0)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, num_nodes=2, node_rank=0, local_rank=0)
    with pytest.raises(ConfigError, match="source_weights"):
        dm.train_dataloader()
    import ase.io

    ase.io.write(tmp_path / "f.extxyz", morse_frames(20), format="extxyz")
    dm = ForceFieldDataModule(cfg.model_copy(update={"train": [str(tmp_path / "f.extxyz")]}), seed=0)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, num_nodes=2, node_rank=0, local_rank=0)
    with pytest.raises(ConfigError, match="needs stores"):
        dm.train_dataloader()


def test_stage_shards_copies_the_nodes_shards_and_links_the_rest(tmp_path, capsys):
    a = _store(tmp_path, "a", 30, 6, seed=0)  # shards 0-4
    b = _store(tmp_path, "b", 12, 6, seed=1)  # shards 5-6
    report = stage_node_shards([a, b], tmp_path / "local", node=1, num_nodes=2)
    assert (report["copied"], report["linked"], report["kept"]) == (3, 4, 0)  # shards 1, 3, 5 are node 1's
    for store, offset in ((a, 0), (b, 5)):
        staged = tmp_path / "local" / store.name
        for k, entry in enumerate(Store(store).manifest["shards"]):
            f = staged / entry["file"]
            assert f.is_symlink() == (node_of_shard(offset + k, 2) != 1), f
        # the staged store reads the same records as the original
        x, y = Store(store), Store(staged)
        assert len(x) == len(y)
        for i in range(len(x)):
            np.testing.assert_array_equal(x[i].pos, y[i].pos)
    # an interrupted copy: a partial file is replaced, complete copies are kept
    victim = next(p for p in (tmp_path / "local" / "a").iterdir() if p.suffix == ".h5" and not p.is_symlink())
    victim.write_bytes(b"partial")
    again = stage_node_shards([a, b], tmp_path / "local", node=1, num_nodes=2)
    assert (again["copied"], again["kept"]) == (1, 2)
    assert Store(tmp_path / "local" / "a")[0].pos.shape[1] == 3
    # staged before for one node (every shard copied), again for node 1 of 2: the others become links
    one = stage_node_shards([a], tmp_path / "re", node=0, num_nodes=1)
    assert (one["copied"], one["linked"]) == (5, 0)
    two = stage_node_shards([a], tmp_path / "re", node=1, num_nodes=2)
    assert (two["kept"], two["linked"]) == (2, 3)
    assert sorted(p.name for p in (tmp_path / "re" / "a").iterdir() if p.is_symlink()) == \
        sorted(p.name for p in (tmp_path / "local" / "a").iterdir() if p.is_symlink())
    with pytest.raises(DataError, match="node 2"):
        stage_node_shards([a], tmp_path / "x", node=2, num_nodes=2)
    # the command, with the node from SLURM's environment
    os.environ["SLURM_NODEID"] = "0"
    try:
        assert main(["stage-shards", str(a), "--to", str(tmp_path / "n0"), "--nodes", "2"]) == 0
    finally:
        del os.environ["SLURM_NODEID"]
    out = json.loads(capsys.readouterr().out)
    assert out["copied"] == 3 and out["linked"] == 2  # shards 0, 2, 4


NODE_SCRIPT = """
import json, sys
import lightning.pytorch as pl
from forcecentric.config import load_run_config
from forcecentric.train import run as run_module
from forcecentric.train.datamodule import _shard_keys


class Record(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keys = _shard_keys(trainer.datamodule.train_set)
        if batch_idx == 0:
            sampler = trainer.train_dataloader.sampler
            with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as fh:
                json.dump({{"node": trainer.node_rank, "local_rank": trainer.local_rank,
                           "items": [int(i) for i in sampler],
                           "shards": sorted({{int(keys[i]) for i in sampler}})}}, fh)


original = run_module._trainer
def trainer(cfg, run_dir):
    t = original(cfg, run_dir)
    t.callbacks.append(Record())
    return t
run_module._trainer = trainer
run_module.run(load_run_config({cfg!r}, {{}}))
"""


@pytest.mark.distributed
@pytest.mark.skipif(not (__import__("torch").distributed.is_available()
                         and __import__("torch").distributed.is_gloo_available()), reason="needs gloo")
def test_two_nodes_under_torchrun_read_disjoint_shard_sets(tmp_path):
    """Two torchrun 'nodes' on this machine (--nnodes 2, one process each, gloo): Lightning's
    node ranks pick the shards, and each node trains only on its own."""
    import socket
    import subprocess
    import sys

    import yaml

    import forcecentric

    store = _store(tmp_path, "corpus", 48, 8, seed=0)  # 6 shards: 0, 2, 4 for node 0; 1, 3, 5 for node 1
    cfg = {"run_dir": str(tmp_path / "run"),
           "model": {"hidden_channels": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8},
           "data": {"train": [str(store)], "n_val": 4, "n_test": 0, "batch_size": 2, "node_local_shards": True},
           "trainer": {"max_epochs": 1, "progress_bar": False, "accelerator": "cpu", "devices": 1, "num_nodes": 2,
                       "strategy": "ddp", "early_stopping_patience": None}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT.format(out=str(tmp_path), cfg=str(tmp_path / "cfg.yaml")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(forcecentric.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["node"] for r in ranks] == [0, 1]
    assert [r["shards"] for r in ranks] == [[0, 2, 4], [1, 3, 5]]
    assert len(ranks[0]["items"]) == len(ranks[1]["items"]) > 0
    assert not set(ranks[0]["items"]) & set(ranks[1]["items"])
    assert (tmp_path / "run" / "model.ckpt").is_file()
