"""Distributed (DDP) training: samplers, config, and a real 2-process run on CPU with gloo.

The samplers are tested in pure Python for world sizes 1..4. The one multi-process test
(``distributed`` marker) starts ``torchrun --nproc_per_node 2`` on the CLI, as docs/distributed.md
says, and checks that one optimizer step at a per-process batch of B/2 gives the parameters
(and the cross-rank validation / training metrics) of one process at batch B, with every run
file written once.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import forcecentric
from forcecentric.config import load_run_config
from forcecentric.data.sampling import DistributedShuffleSampler, ResumableSampler
from forcecentric.data.store import WeightedSourceSampler
from forcecentric.errors import ConfigError, DataError

from conftest import morse_frames


def _gloo() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_gloo_available()


# ------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [4, 37, 100])
def test_shuffle_sampler_partitions_every_epoch_without_repeats(world, n):
    seen_orders, skipped = [], []
    for epoch in range(4):
        ranks = []
        for r in range(world):
            s = DistributedShuffleSampler(n, world, r, seed=7)
            s.set_epoch(epoch)
            ranks.append(list(s))
            assert len(ranks[-1]) == len(s) == n // world  # the same number of items on every rank
        union = [i for part in ranks for i in part]
        assert len(union) == len(set(union))  # no conformation twice in an epoch
        assert set(union) <= set(range(n)) and n - len(union) == n % world < world
        skipped.append(frozenset(range(n)) - set(union))
        seen_orders.append(ranks)
    # a new order every epoch; the remainder left out moves around
    assert all(seen_orders[e] != seen_orders[0] for e in range(1, 4))
    if n % world:
        assert len(set(skipped)) > 1
    # the same (seed, epoch) gives the same split; another seed another
    again = DistributedShuffleSampler(n, world, 0, seed=7)
    again.set_epoch(3)
    assert list(again) == seen_orders[3][0]
    assert list(DistributedShuffleSampler(n, world, 0, seed=8)) != seen_orders[0][0]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_shards_cover_every_item_once(world):
    n = 23
    shards = [list(DistributedShuffleSampler(n, world, r, shuffle=False, drop_last=False)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert {len(s) for s in shards} <= {n // world, -(-n // world)}
    assert [len(s) for s in shards] == [len(DistributedShuffleSampler(n, world, r, shuffle=False, drop_last=False))
                                        for r in range(world)]
    with pytest.raises(DataError, match="rank 4"):
        DistributedShuffleSampler(n, 4, 4)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_weighted_sampler_keeps_source_shares_on_every_rank(world):
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}  # a: 1/4 of the draws, b: 1/4, c: 1/2 (c oversampled)
    n = 1001
    for epoch in (0, 1):
        draws = []
        for r in range(world):
            s = WeightedSourceSampler(labels, weights, n, seed=3, num_replicas=world, rank=r, drop_last=True)
            s.set_epoch(epoch)
            mine = list(s)
            assert len(mine) == len(s) == n // world
            share = Counter(labels[i] for i in mine)
            for k, p in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
                assert share[k] / len(mine) == pytest.approx(p, abs=0.05)
            draws.extend(mine)
        # the ranks split one epoch's draws: no padding repeats; a and b (not oversampled) once each
        assert len(draws) == n - n % world
        counts = Counter(draws)
        assert max(counts[i] for i in range(900)) == 1


def test_lightning_calls_set_epoch_on_our_sampler(tmp_path):
    """With use_distributed_sampler=False Lightning keeps the sampler and calls its set_epoch
    at the start of every epoch, so every epoch is split anew."""
    import lightning.pytorch as pl

    seen: dict[int, list[int]] = {}

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.setdefault(self.current_epoch, []).extend(batch.tolist())
            return (self.w * batch.float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    sampler = DistributedShuffleSampler(10, num_replicas=2, rank=1, seed=5)
    loader = torch.utils.data.DataLoader(torch.arange(10), batch_size=2, sampler=sampler)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Probe(), loader)
    for epoch in range(3):
        ref = DistributedShuffleSampler(10, num_replicas=2, rank=1, seed=5)
        ref.set_epoch(epoch)
        assert seen[epoch] == list(ref)
    assert seen[0] != seen[1] != seen[2]


def _morse_file(path: Path, n: int) -> Path:
    import ase.io

    ase.io.write(path, morse_frames(n), format="extxyz")
    return path


def test_datamodule_builds_per_rank_samplers(tmp_path):
    from forcecentric.train.datamodule import ForceFieldDataModule

    data = _morse_file(tmp_path / "m.extxyz", 23)
    cfg = load_run_config(None, {"data.train": [str(data)], "data.n_val": 5, "data.batch_size": 2}).data

    def module(world, rank, **over):
        dm = ForceFieldDataModule(cfg.model_copy(update=over), seed=0)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        return dm

    def loaders(world, rank, **over):
        dm = module(world, rank, **over)
        return dm, dm.train_dataloader(), dm.val_dataloader()

    # one process: a permutation of all 18 drawn from (seed, epoch), so an epoch can be replayed
    dm, train, val = loaders(1, 0)
    assert isinstance(train.sampler, ResumableSampler)
    assert isinstance(train.sampler.base, DistributedShuffleSampler)
    assert sorted(train.sampler) == list(range(18)) and list(train.sampler) == list(train.sampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    # three processes: disjoint training shares of 18 // 3, validation shards covering all 5
    tr, va = [], []
    for r in range(3):
        dm, train, val = loaders(3, r)
        assert isinstance(train.sampler.base, DistributedShuffleSampler) and len(train) == 3  # 6 items, batch 2
        tr.append(list(train.sampler))
        va.append(list(val.sampler))
    flat = [i for s in tr for i in s]
    assert len(flat) == len(set(flat)) == 18 and len(dm.train_set) == 18
    assert sorted(i for s in va for i in s) == list(range(5))
    # weighted sources: the weighted sampler, per rank
    dm, train, _ = loaders(2, 1, source_weights={"morse-test": 1.0})
    assert isinstance(train.sampler.base, WeightedSourceSampler) and train.sampler.base.rank == 1
    assert train.sampler.base.num_replicas == 2 and len(train.sampler) == 9
    # a validation set smaller than the number of processes would leave a rank without batches
    dm = module(6, 0)
    with pytest.raises(DataError, match="fewer than the 6 processes"):
        dm.val_dataloader()


def test_trainer_config_for_distributed_runs():
    from forcecentric.train.run import global_batch_size

    cfg = load_run_config(None, {"trainer.precision": 32, "trainer.strategy": "ddp", "trainer.devices": 4,
                                 "trainer.num_nodes": 2, "trainer.accumulate_grad_batches": 3,
                                 "data.batch_size": 16})
    assert cfg.trainer.precision == "32" and cfg.trainer.lightning_precision == "32-true"
    assert global_batch_size(cfg, 4 * 2) == 16 * 8 * 3
    for p, lp in (("64", "64-true"), ("bf16-mixed", "bf16-mixed")):
        assert load_run_config(None, {"trainer.precision": p}).trainer.lightning_precision == lp
    with pytest.raises(ConfigError, match="strategy"):
        load_run_config(None, {"trainer.strategy": "fsdp"})
    with pytest.raises(ConfigError, match="precision"):
        load_run_config(None, {"trainer.precision": "16"})
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        load_run_config(None, {"trainer.accumulate_grad_batches": 0})


def test_bf16_mixed_forces_train_under_autocast(tmp_path, tiny_config):
    """precision: bf16-mixed runs the model under bfloat16 autocast: the forces (a gradient of
    the energy) and the second backward of training work with the mixed dtypes."""
    from forcecentric.data import read_all
    from forcecentric.data.dataset import collate
    from forcecentric.nn.model import ForceField
    from forcecentric.objectives import make_views, total_loss

    b = collate(read_all(_morse_file(tmp_path / "m.extxyz", 3)))
    torch.manual_seed(0)
    model = ForceField(tiny_config)
    cfg = load_run_config(None, {}).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = make_views(b, cfg)
        out = model(v.batch.z, v.batch.pos, v.batch.batch, v.batch.n_graphs, create_graph=True)
        loss = total_loss(out, v, cfg)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and out["forces"].shape == b.pos.shape
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------- 2-process training
def _last(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key)]
    assert vals, key
    return vals[-1]


@pytest.mark.distributed
@pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available")
def test_two_processes_take_the_step_of_one_process_with_the_global_batch(tmp_path):
    from forcecentric.checkpoint import load
    from forcecentric.train.run import run

    data = _morse_file(tmp_path / "morse.extxyz", 13)  # all ethanol: every rank the same atoms
    base = {
        "model": {"hidden_channels": 32, "num_layers": 2, "num_heads": 4, "num_rbf": 16},
        # 8 training frames = one batch of 8, or two processes x 4; 5 validation frames: shards 3 + 2
        "data": {"train": [str(data)], "n_train": 8, "n_val": 5, "n_test": 0, "batch_size": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "gradient_clip": None, "ema_decay": None,
                  "schedule": "constant"},
        "loss": {"zero_force": 0.0, "denoise": 0.0},
        "trainer": {"max_epochs": 1, "progress_bar": False, "accelerator": "cpu", "devices": 2,
                    "strategy": "ddp", "precision": "64", "early_stopping_patience": None},
    }
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(base))
    two = tmp_path / "two"
    src = str(Path(forcecentric.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "forcecentric.cli", "pretrain", "-c", str(cfg_file), "--run-dir", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count('"global_steps"') == 1  # rank 0 alone reports

    one_cfg = load_run_config(cfg_file, {"run_dir": str(tmp_path / "one"), "trainer.devices": 1,
                                         "trainer.strategy": "auto", "data.batch_size": 8})
    one = run(one_cfg)

    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["batch_size_per_device"] == 4
    assert m2["global_batch_size"] == one["global_batch_size"] == 8 and one["world_size"] == 1
    assert m2["global_steps"] == one["global_steps"] == 1

    # the same parameters after the step
    a = load(tmp_path / "one" / "model.ckpt", dtype=torch.float64).state_dict()
    b = load(two / "model.ckpt", dtype=torch.float64).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    init = _initial_weights(one_cfg)  # the step did move the weights (the test compares something)
    moved = max((a[k] - init[k]).abs().max().item() for k in init if a[k].is_floating_point())
    assert moved > 1e-4

    # gradient accumulation: two batches of 4 in one process make the same step as well
    acc = run(load_run_config(cfg_file, {"run_dir": str(tmp_path / "acc"), "trainer.devices": 1,
                                         "trainer.strategy": "auto", "trainer.accumulate_grad_batches": 2}))
    assert acc["global_batch_size"] == 8 and acc["global_steps"] == 1
    c = load(tmp_path / "acc" / "model.ckpt", dtype=torch.float64).state_dict()
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")

    # metrics reduced across ranks: the epoch's training loss (4 + 4 frames) and the validation
    # errors (shards of 3 and 2 frames, weighted by their sizes) equal the one-process values
    rows = {name: list(csv.DictReader(open(d / "metrics.csv"))) for name, d in (("one", tmp_path / "one"), ("two", two))}
    for key in ("train/loss_epoch", "val/loss", "val/force_mae"):
        assert _last(rows["two"], key) == pytest.approx(_last(rows["one"], key), rel=1e-8, abs=1e-10), key

    # every file once: checkpoints without versioned duplicates, one header in metrics.csv
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [line.startswith("epoch,") for line in open(two / "metrics.csv")].count(True) == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def _initial_weights(cfg) -> dict[str, torch.Tensor]:
    """The initial weights of ``cfg``'s model (as run() makes them), float64."""
    from forcecentric.train.datamodule import ForceFieldDataModule
    from forcecentric.train.run import _init_model

    dm = ForceFieldDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    return {k: v.double() for k, v in _init_model(cfg, dm).state_dict().items()}
