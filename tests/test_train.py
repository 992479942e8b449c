"""Training: overfitting, run directories, checkpoints, resume, fine-tuning, NaN handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
import torch

import forcecentric
from forcecentric.checkpoint import load, save_model
from forcecentric.config import load_run_config
from forcecentric.data import read_all
from forcecentric.data.dataset import collate
from forcecentric.errors import CheckpointError, ConfigError, TrainingDivergedError
from forcecentric.nn.model import ForceField
from forcecentric.objectives import make_views, total_loss
from forcecentric.train.run import run


def _cfg(tmp_path, data_file, **over):
    base = {
        "run_dir": str(tmp_path / "run"),
        "model.hidden_channels": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_rbf": 16,
        "data.train": [str(data_file)], "data.n_val": 8, "data.n_test": 8, "data.batch_size": 8,
        "trainer.max_epochs": 2, "trainer.progress_bar": False, "optim.warmup_steps": 2,
    }
    base.update(over)
    return load_run_config(None, base)


def test_tiny_model_overfits_a_few_conformations(tiny_config, morse_file):
    torch.manual_seed(0)
    recs = read_all(morse_file)[:4]
    recs = [r for r in recs if not r.equilibrium][:3]
    b = collate(recs)
    model = ForceField(tiny_config)
    model.set_normalization(scale=float(np.sqrt(np.mean(np.concatenate([r.forces for r in recs]) ** 2))))
    cfg = load_run_config(None, {"loss.zero_force": 0.0, "loss.denoise": 0.0}).loss
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(300):
        v = make_views(b, cfg)
        out = model(v.batch.z, v.batch.pos, v.batch.batch, v.batch.n_graphs, create_graph=True)
        loss = total_loss(out, v, cfg)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * first


def test_pretrain_run_writes_a_complete_run_dir(tmp_path, morse_file):
    cfg = _cfg(tmp_path, morse_file)
    metrics = run(cfg)
    d = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "metrics.json", "learning_curve.png", "model.ckpt",
                 "checkpoints/last.ckpt", "test_parity.png", "val_metrics.json"):
        assert (d / name).is_file(), name
    saved = json.loads((d / "metrics.json").read_text())
    assert saved["epochs"] == 2 and np.isfinite(saved["test"]["force_mae"])
    assert metrics["test"]["n_conformations"] == 8
    model = forcecentric.load(d / "model.ckpt")
    assert model.elements == [1, 6, 8]
    assert model.metadata["data"]["train"]["n_conformations"] == 24
    assert model.metadata["package_version"] == forcecentric.__version__
    # the Lightning checkpoint is loadable on its own too
    lk = load(d / "checkpoints" / "last.ckpt")
    assert lk.config == model.config
    # refuses to overwrite a finished run unless resuming
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg)


def test_resume_continues_where_the_run_stopped(tmp_path, morse_file):
    run(_cfg(tmp_path, morse_file, **{"trainer.max_epochs": 1}))
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    steps_before = ck["global_step"]
    metrics = run(_cfg(tmp_path, morse_file, **{"trainer.max_epochs": 3}), resume=True)
    assert metrics["epochs"] == 3
    assert metrics["global_steps"] == 3 * steps_before
    import csv

    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    # the rows of the first epoch survive the resume
    assert {int(r["epoch"]) for r in rows if r.get("val/loss")} == {0, 1, 2}
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(_cfg(tmp_path / "other", morse_file), resume=True)


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path, tiny_config):
    torch.manual_seed(1)
    model = ForceField(tiny_config)
    model.set_normalization(scale=2.0, shift=0.1, atomref={1: -13.6, 8: -2000.0})
    model.elements = [1, 8]
    path = save_model(model, tmp_path / "m.ckpt", note="x")
    back = load(path)
    z = torch.tensor([8, 1, 1])
    pos = torch.tensor([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0.1]])
    model.eval()
    a, b = model(z, pos), back(z, pos)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    assert back.metadata["note"] == "x" and back.elements == [1, 8]


def test_incompatible_or_broken_checkpoints_are_refused(tmp_path, tiny_config):
    model = ForceField(tiny_config)
    path = save_model(model, tmp_path / "m.ckpt")
    payload = torch.load(path, weights_only=False)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.ckpt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load(tmp_path / "future.ckpt")
    payload["format_version"] = 1
    payload["package_version"] = "7.0.0"
    torch.save(payload, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="incompatible"):
        load(tmp_path / "old.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load(tmp_path / "trunc.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing.ckpt")


def test_finetune_starts_from_pretrained_weights_and_fits_references(tmp_path, morse_file):
    run(_cfg(tmp_path, morse_file, run_dir=str(tmp_path / "pre")))
    pre = load(tmp_path / "pre" / "model.ckpt")
    cfg = _cfg(tmp_path, morse_file, run_dir=str(tmp_path / "ft"), task="finetune",
               init_from=str(tmp_path / "pre" / "model.ckpt"), **{"loss.energy": 1.0,
                                                                   "trainer.max_epochs": 1,
                                                                   "optim.lr": 1e-12, "optim.ema_decay": None})
    run(cfg)
    ft = load(tmp_path / "ft" / "model.ckpt")
    # lr ~ 0: the representation is the pre-trained one
    for (k, a), (_, b) in zip(pre.representation.state_dict().items(), ft.representation.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    # reference energies fitted on the fine-tuning energies: mean energy error is small
    from forcecentric.train.datamodule import ForceFieldDataModule

    dm = ForceFieldDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    recs = [dm.train_set[i] for i in range(len(dm.train_set))]
    e_ref = np.array([r.energy for r in recs])
    b = collate(recs)
    e_pred = ft(b.z, b.pos, b.batch, b.n_graphs)["energy"].detach().numpy()
    assert abs(np.mean(e_pred - e_ref)) < 0.05 * np.std(e_ref) + 1e-3
    assert ft.metadata["pretrained_from"].endswith("model.ckpt")


def test_representation_lr_factor_slows_the_representation_only(tmp_path, morse_file):
    """optim.representation_lr_factor: the ET representation trains at that fraction of optim.lr
    (through warm-up and schedule), the heads at optim.lr; a factor near 0 keeps the pre-trained
    representation while the heads move."""
    run(_cfg(tmp_path, morse_file, run_dir=str(tmp_path / "pre")))
    pre = load(tmp_path / "pre" / "model.ckpt")
    cfg = _cfg(tmp_path, morse_file, run_dir=str(tmp_path / "ft"), task="finetune",
               init_from=str(tmp_path / "pre" / "model.ckpt"),
               **{"optim.lr": 1e-2, "optim.ema_decay": None, "optim.warmup_steps": 3,
                  "optim.representation_lr_factor": 1e-9})
    run(cfg)
    ft = load(tmp_path / "ft" / "model.ckpt")
    for k, a in pre.representation.state_dict().items():
        assert torch.allclose(a, ft.representation.state_dict()[k], atol=1e-7), k
    moved = [k for k, a in pre.state_dict().items()
             if not k.startswith("representation.") and a.is_floating_point() and a.numel() > 1
             and not torch.allclose(a, ft.state_dict()[k])]
    assert moved, "the heads did not train"
    import csv

    rows = [r for r in csv.DictReader((tmp_path / "ft" / "metrics.csv").open()) if r.get("lr-AdamW/heads")]
    assert rows
    for r in rows:
        assert float(r["lr-AdamW/representation"]) == pytest.approx(1e-9 * float(r["lr-AdamW/heads"]))
    with pytest.raises(ConfigError, match="representation_lr_factor"):
        _cfg(tmp_path, morse_file, **{"optim.representation_lr_factor": 2.0})


def test_l2sp_keeps_the_representation_near_its_pretrained_weights(tmp_path, morse_file):
    """optim.l2sp pulls the representation toward the init_from weights: the fine-tuned
    representation ends closer to them than without it; the anchors travel in the training
    checkpoint (for --resume) but not in the exported model; without init_from it is an error."""
    run(_cfg(tmp_path, morse_file, run_dir=str(tmp_path / "pre")))
    pre = load(tmp_path / "pre" / "model.ckpt")
    distance = {}
    for l2sp in (0.0, 30.0):
        d = tmp_path / f"ft{l2sp}"
        run(_cfg(tmp_path, morse_file, run_dir=str(d), task="finetune", init_from=str(tmp_path / "pre" / "model.ckpt"),
                 **{"optim.lr": 1e-2, "optim.ema_decay": None, "optim.l2sp": l2sp, "trainer.max_epochs": 3}))
        ft = load(d / "model.ckpt")
        distance[l2sp] = sum(float((a - ft.representation.state_dict()[k]).pow(2).sum())
                             for k, a in pre.representation.state_dict().items() if a.is_floating_point())
        assert not any(k.startswith("l2sp_anchor") for k in ft.state_dict())
    assert 0 < distance[30.0] < 0.2 * distance[0.0]
    raw = torch.load(tmp_path / "ft30.0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    anchor = raw["state_dict"]["l2sp_anchor__representation__embedding__weight"]
    assert torch.equal(anchor, pre.representation.embedding.weight.detach())
    with pytest.raises(ConfigError, match="l2sp"):
        _cfg(tmp_path, morse_file, **{"optim.l2sp": 1.0})


def test_nan_loss_stops_training_without_writing_a_checkpoint(tmp_path, morse_file):
    cfg = _cfg(tmp_path, morse_file, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                                        "optim.gradient_clip": None, "optim.schedule": "constant"})
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        run(cfg)
    assert not (tmp_path / "run" / "model.ckpt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_bad_config_is_reported_with_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_chanels: 32\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(p)
    text = str(info.value)
    assert "c.yaml" in text and "model.hidden_chanels" in text and "optim.lr" in text


def test_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    from forcecentric.errors import DataError

    with pytest.raises(DataError, match="empty"):
        run(_cfg(tmp_path, empty))


def test_training_reads_a_store_lazily(tmp_path, morse_file):
    from forcecentric.data.build import build_store

    report = build_store([morse_file], tmp_path / "store", progress=False)
    # the 8 identical equilibrium frames of the fixture are deduplicated to one
    n = report["statistics"]["n_conformations"]
    assert n == 33
    cfg = _cfg(tmp_path, tmp_path / "store", **{"trainer.max_epochs": 1, "data.split_by_molecule": False,
                                                 "data.num_workers": 2})
    metrics = run(cfg)
    assert metrics["train_size"] == n - 16 and metrics["test"]["n_conformations"] == 8
    model = load(tmp_path / "run" / "model.ckpt")
    assert model.metadata["data"]["train"]["n_conformations"] == n - 16


def test_source_weights_steer_the_training_sampler(tmp_path, morse_file):
    import ase.io

    from conftest import morse_frames
    from forcecentric.train.datamodule import ForceFieldDataModule

    other = tmp_path / "other.extxyz"
    frames = morse_frames(40, seed=3)
    for a in frames:
        a.info["source"] = "second"
    ase.io.write(other, frames, format="extxyz")
    cfg = _cfg(tmp_path, morse_file, **{"data.train": [str(morse_file), str(other)], "data.n_val": 4,
                                        "data.n_test": 0, "data.source_weights": {"second": 1.0}})
    dm = ForceFieldDataModule(cfg.data, seed=0)
    dm.setup()
    drawn = list(dm.train_dataloader().sampler)
    assert len(drawn) == len(dm.train_set)
    assert {dm.train_set[i].source for i in drawn} == {"second"}


def test_cosine_schedule_follows_steps_or_a_time_budget():
    from forcecentric.train.lightning_module import cosine_factor

    assert cosine_factor(5, total=100, warmup=10, floor=0.01) == 1.0  # warm-up: the warm-up ramp rules
    assert cosine_factor(10, total=100, warmup=10, floor=0.01) == pytest.approx(1.0)
    assert cosine_factor(55, total=100, warmup=10, floor=0.0) == pytest.approx(0.5)
    assert cosine_factor(100, total=100, warmup=10, floor=0.01) == pytest.approx(0.01)
    # a wall-time budget half used takes the schedule half way even at step 10 ...
    assert cosine_factor(10, total=100, warmup=10, floor=0.0, time_used=0.5) == pytest.approx(0.5)
    # ... and a spent budget ends it at the floor; steps ahead of time still count
    assert cosine_factor(10, total=100, warmup=10, floor=0.02, time_used=1.3) == pytest.approx(0.02)
    assert cosine_factor(100, total=100, warmup=10, floor=0.0, time_used=0.1) == pytest.approx(0.0)


@pytest.mark.parametrize("schedule", ["plateau", "cosine", "constant"])
def test_the_logged_rate_is_the_rate_each_epochs_first_step_uses(tmp_path, morse_file, monkeypatch, schedule):
    """With a warm-up, the rate monitor's value at an epoch's start is the rate the epoch's first
    optimizer step uses: lr / warmup_steps at epoch 0, not the full rate the ramp has not reached."""
    import csv

    import lightning.pytorch as pl

    from forcecentric.train import run as run_module

    used: list[float] = []

    class Rates(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            used.append(optimizer.param_groups[0]["lr"])

    original = run_module._trainer

    def trainer(cfg, run_dir):
        t = original(cfg, run_dir)
        t.callbacks.append(Rates())
        return t

    monkeypatch.setattr(run_module, "_trainer", trainer)
    # 24 training frames, batch 8: 3 steps per epoch; the warm-up spans the first 4 steps
    cfg = _cfg(tmp_path, morse_file, **{"optim.lr": 1e-3, "optim.warmup_steps": 4, "optim.schedule": schedule,
                                        "optim.ema_decay": None, "trainer.max_epochs": 3})
    run_module.run(cfg)
    assert used[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    logged = [float(r["lr-AdamW"]) for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open())
              if r.get("lr-AdamW")]
    assert logged == pytest.approx([used[0], used[3], used[6]])


@pytest.mark.parametrize("spec", ["bundled:demo_pretrain", "bundled:corpus"])
def test_equilibrium_only_molecules_keep_just_their_minima(spec):
    from forcecentric.config import DataConfig
    from forcecentric.train.datamodule import ForceFieldDataModule, equilibrium_only_molecules

    def train_records(fraction):
        dm = ForceFieldDataModule(DataConfig(train=[spec], n_val=20, equilibrium_only_molecules=fraction), seed=0)
        dm.setup()
        return dm, [(r.mol_id, bool(r.equilibrium)) for r in (dm.train_set[i] for i in range(len(dm.train_set)))]

    _, full = train_records(None)
    dm, half = train_records(0.5)
    hidden = equilibrium_only_molecules([m for m, _ in full], 0.5)
    assert 0 < len(hidden) < len({m for m, _ in full}) and dm.hidden_molecules == len(hidden)
    expected = [(m, eq) for m, eq in full if eq or m not in hidden]
    assert half == expected  # hidden molecules keep their minima, the others keep everything
    assert any(m in hidden and eq for m, eq in half)
    assert len(dm.val_set) == 20  # validation is untouched
    _, none = train_records(1.0)
    assert none and all(eq for _, eq in none)


def test_resume_after_sigkill_with_early_stopping(tmp_path, morse_file):
    """A run killed with SIGKILL resumes from last.ckpt, which was written at the end of a
    validation inside an epoch that never completed; early stopping must not trip over the
    metrics that the resumed process has not logged yet."""
    import signal
    import subprocess
    import sys
    import time

    cfg = _cfg(tmp_path, morse_file, **{"trainer.max_epochs": 1000, "trainer.early_stopping_patience": 500,
                                        "optim.schedule": "plateau"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "forcecentric.cli", "pretrain", "-c", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600  # a loaded machine (CI beside training runs) took over 120 s to get here
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if not last.is_file():
        pytest.fail(f"the run wrote no {last} before it was killed (exit code {proc.returncode})")
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert epoch >= 2
    metrics = run(_cfg(tmp_path, morse_file, **{"trainer.max_epochs": epoch + 3, "trainer.early_stopping_patience": 500,
                                                "optim.schedule": "plateau"}), resume=True)
    assert metrics["epochs"] == epoch + 3


def test_early_stopping_at_min_lr_waits_for_the_learning_rate_floor(tmp_path, morse_file):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping

    from forcecentric.train.callbacks import EarlyStoppingAtMinLR
    from forcecentric.train.run import _trainer

    def check(callback, losses_and_lrs):
        """Feed validation losses at given learning rates; the epoch at which it stops, or None."""
        opt = SimpleNamespace(param_groups=[{"lr": 0.0}])
        trainer = SimpleNamespace(fast_dev_run=False, callback_metrics={}, should_stop=False, current_epoch=0,
                                  optimizers=[opt], strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d))
        for epoch, (loss, lr) in enumerate(losses_and_lrs):
            trainer.current_epoch, opt.param_groups[0]["lr"] = epoch, lr
            trainer.callback_metrics = {"val/loss": torch.tensor(loss)}
            callback._run_early_stopping_check(trainer)
            if trainer.should_stop:
                return epoch
        return None

    # best at epoch 0, then no improvement while the rate is halved down to its floor 1e-4
    history = [(1.0, 1e-3), (1.1, 1e-3), (1.2, 1e-3), (1.1, 5e-4), (1.1, 2.5e-4), (1.3, 1.25e-4), (1.2, 1e-4),
               (1.2, 1e-4)]
    plain = EarlyStopping(monitor="val/loss", mode="min", patience=2)
    assert check(plain, history) == 2  # two epochs without improvement, at the top rate
    at_floor = EarlyStoppingAtMinLR(min_lr=1e-4, monitor="val/loss", mode="min", patience=2)
    assert check(at_floor, history) == 6  # the first epoch at the floor
    assert at_floor.wait_count == 6
    # an improvement on the way down resets the count; at the floor the patience must run out again
    history2 = history[:4] + [(0.5, 2.5e-4), (0.6, 1e-4), (0.6, 1e-4), (0.6, 1e-4)]
    assert check(EarlyStoppingAtMinLR(min_lr=1e-4, monitor="val/loss", mode="min", patience=2), history2) == 6
    # a non-finite validation loss still stops at once
    nan = [(1.0, 1e-3), (float("nan"), 1e-3)]
    assert check(EarlyStoppingAtMinLR(min_lr=1e-4, monitor="val/loss", mode="min", patience=2), nan) == 1
    # the run config chooses the callback; the option needs a plateau schedule
    cfg = _cfg(tmp_path, morse_file, **{"optim.schedule": "plateau", "optim.min_lr": 1e-5,
                                        "trainer.early_stopping_at_min_lr": True})
    stops = [c for c in _trainer(cfg, tmp_path / "run").callbacks if isinstance(c, EarlyStopping)]
    assert len(stops) == 1 and isinstance(stops[0], EarlyStoppingAtMinLR) and stops[0].min_lr == 1e-5
    with pytest.raises(ConfigError, match="early_stopping_at_min_lr"):
        _cfg(tmp_path, morse_file, **{"optim.schedule": "cosine", "trainer.early_stopping_at_min_lr": True})
