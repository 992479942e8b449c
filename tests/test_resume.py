"""Fault tolerance: a training run killed with SIGKILL in the middle of an epoch resumes from its
last checkpoint and continues exactly as the uninterrupted run would have: the same batches in
the same order, the same denoising noise, optimizer, learning-rate schedule and EMA weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from forcecentric.config import load_run_config
from forcecentric.data.sampling import DistributedShuffleSampler, ResumableSampler
from forcecentric.train import run as run_module

TESTS = Path(__file__).resolve().parent


class Probe(pl.Callback):
    """Appends, before every training batch, the optimizer step and a fingerprint of the batch
    (each conformation's sum of coordinates, in batch order) to a JSON-lines file (``{rank}`` in
    its name: one file per process); kills its own process with SIGKILL before step ``kill_at``."""

    def __init__(self, path: str | Path, kill_at: int | None = None):
        self.path = Path(path)
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        sums = torch.zeros(batch.n_graphs, dtype=torch.float64).index_add_(
            0, batch.batch, batch.pos.double().sum(dim=1))
        with open(str(self.path).format(rank=trainer.global_rank), "a") as fh:
            fh.write(json.dumps({"step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                                 "batch": [round(float(x), 4) for x in sums]}) + "\n")


_TRAINER = run_module._trainer  # the unwrapped one, so probes installed one after the other do not stack


def with_probe(probe: Probe):
    """``run_module._trainer`` with ``probe`` added to the Trainer's callbacks."""
    original = _TRAINER

    def trainer(cfg, run_dir):
        t = original(cfg, run_dir)
        t.callbacks.append(probe)
        return t

    return trainer


KILLER = """
import sys
sys.path.insert(0, {tests!r})
from forcecentric.config import load_run_config
from forcecentric.train import run as run_module
from test_resume import Probe, with_probe

cfg = load_run_config({cfg!r}, {{}})
run_module._trainer = with_probe(Probe({log!r}, kill_at={kill_at}))
run_module.run(cfg, resume={resume})
"""


def _config(tmp_path, data, run_dir, **over):
    base = {
        "run_dir": str(run_dir), "seed": 3,
        "model.hidden_channels": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_rbf": 16,
        "data.train": [str(data)], "data.n_val": 8, "data.n_test": 8, "data.batch_size": 4,
        # force matching, zero-force regularization and denoising (random noise) all on
        "loss.zero_force": 0.1, "loss.denoise": 0.1,
        "optim.schedule": "cosine", "optim.warmup_steps": 2, "optim.ema_decay": 0.9,
        "trainer.max_epochs": 3, "trainer.early_stopping_patience": None, "trainer.progress_bar": False,
        "trainer.checkpoint_every_n_steps": 2,
    }
    base.update(over)
    return load_run_config(None, base)


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkill_mid_epoch_resumes_exactly(tmp_path, morse_file, monkeypatch):
    # 40 frames (every 5th an equilibrium minimum): 24 training, batch 4, so 6 steps per epoch
    ref_cfg = _config(tmp_path, morse_file, tmp_path / "ref")
    monkeypatch.setattr(run_module, "_trainer", with_probe(Probe(tmp_path / "ref.jsonl")))
    run_module.run(ref_cfg)
    reference = _steps(tmp_path / "ref.jsonl")
    assert [s["step"] for s in reference] == list(range(18))

    # the same run in its own process, killed with SIGKILL before step 9: epoch 1, batch 3. Its
    # last checkpoint is the one written after step 8 (every 2 steps), mid-epoch
    cfg = _config(tmp_path, morse_file, tmp_path / "killed")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = KILLER.format(tests=str(TESTS), cfg=str(tmp_path / "cfg.yaml"), log=str(tmp_path / "killed.jsonl"),
                           kill_at=9, resume=False)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = _steps(tmp_path / "killed.jsonl")
    assert [s["step"] for s in killed] == list(range(9))
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    ck = torch.load(last, weights_only=False)
    assert (ck["epoch"], ck["global_step"]) == (1, 8)
    state = ck["ForceFieldDataModule"]
    assert state["epoch"] == 1 and state["batches"] == 2 and state["position"] == 8  # mid-epoch
    assert "current_model_state" in ck and ck["optimizer_states"] and ck["lr_schedulers"]  # EMA, AdamW, cosine

    # resume: steps 8 to 17 are the reference's, batch for batch (the sampler continues epoch 1
    # after its first 8 conformations; epoch 2 is drawn as in the reference)
    monkeypatch.setattr(run_module, "_trainer", with_probe(Probe(tmp_path / "resumed.jsonl")))
    metrics = run_module.run(cfg, resume=True)
    resumed = _steps(tmp_path / "resumed.jsonl")
    assert [s["step"] for s in resumed] == list(range(8, 18))
    assert killed[:8] + resumed == reference
    assert metrics["global_steps"] == 18 and metrics["epochs"] == 3

    # and the end state is the reference's: weights, EMA weights, optimizer moments, schedule
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["global_step"] == b["global_step"] == 18
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    # The two runs agree to float32 rounding, not bit for bit: with one thread the weights differ in
    # their last bits (1e-7), and a moment whose gradients cancel carries that as a large relative
    # error on a tiny element. So each moment is compared at a tolerance scaled to its own tensor.
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in oa:
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob[i][m], oa[i][m], rtol=1e-5, atol=1e-4 * float(oa[i][m].abs().max()) + 1e-12,
                                       msg=f"{m} of parameter {i}")
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert b["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        a["optimizer_states"][0]["param_groups"][0]["lr"])


def test_resumable_sampler_skips_the_trained_part_of_one_epoch_only():
    base = DistributedShuffleSampler(20, num_replicas=2, rank=1, seed=4)
    s = ResumableSampler(base)
    full = {}
    for epoch in (2, 3):
        s.set_epoch(epoch)
        full[epoch] = list(s)
    s.resume(2, 3)
    assert s.epoch == 2 and len(s) == 10  # the length stays the full epoch's (Lightning counts the done batches)
    assert list(s) == full[2][3:]
    assert list(s) == full[2]  # the skip applies to one pass only
    s.resume(2, 3)
    s.set_epoch(3)  # a checkpoint from an earlier epoch: nothing is skipped
    assert list(s) == full[3]
    with pytest.raises(TypeError, match="set_epoch"):
        ResumableSampler(torch.utils.data.SequentialSampler(range(3)))


def test_resumed_epoch_continues_with_another_number_of_processes(tmp_path, morse_file):
    """The position in an epoch is counted in draws of the one sequence all ranks share, so a run
    checkpointed with 2 processes and resumed with 4 (or 1) leaves out exactly the draws already
    trained on."""
    from types import SimpleNamespace

    from forcecentric.train.datamodule import ForceFieldDataModule

    cfg = load_run_config(None, {"data.train": [str(morse_file)], "data.n_val": 8, "data.n_test": 0,
                                 "data.batch_size": 2}).data  # 32 training frames

    def shares(world, state=None):
        out = []
        for rank in range(world):
            dm = ForceFieldDataModule(cfg, seed=1)
            dm.setup("fit")
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
            if state is not None:
                dm.load_state_dict(state)
            sampler = dm.train_dataloader().sampler
            out.append(list(sampler))
        return out

    sequence = DistributedShuffleSampler(32, seed=1)
    sequence.set_epoch(5)
    order = list(sequence)
    # 2 processes had done 3 batches of 2 in epoch 5: the first 12 draws of the epoch's order
    state = {"epoch": 5, "batches": 3, "batch_size": 2, "world_size": 2, "position": 12, "seed": 1}
    for world in (1, 2, 4):
        rest = shares(world, state)
        seen = sorted(i for share in rest for i in share)
        assert seen == sorted(order[12:]), world
    # a checkpoint written at the end of epoch 5 starts epoch 6 whole
    done = dict(state, batches=8, position=32)
    sequence.set_epoch(6)
    assert sorted(i for share in shares(2, done) for i in share) == sorted(sequence)
    assert shares(1, done)[0] == list(sequence)


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_sigkill_mid_epoch_resumes_a_two_process_run_exactly(tmp_path, morse_file):
    """The same with 2 processes under torchrun (gloo): both ranks die with SIGKILL before step 9;
    torchrun --resume continues each rank's share of epoch 1 and ends where the uninterrupted
    2-process run ends."""
    import forcecentric

    src = str(Path(forcecentric.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")

    def torchrun(name: str, kill_at: int | None, resume: bool) -> subprocess.CompletedProcess:
        # 24 training frames: 12 per process, batch 2, so 6 steps per epoch
        cfg = _config(tmp_path, morse_file, tmp_path / name, **{
            "data.batch_size": 2, "trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp"})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        script = tmp_path / f"{name}_{int(resume)}.py"
        script.write_text(KILLER.format(tests=str(TESTS), cfg=str(tmp_path / f"{name}.yaml"),
                                        log=str(tmp_path / f"{name}_{int(resume)}_{{rank}}.jsonl"),
                                        kill_at=kill_at, resume=resume))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    ref = torchrun("ref", None, False)
    assert ref.returncode == 0, ref.stderr[-4000:]
    killed = torchrun("killed", 9, False)
    assert killed.returncode != 0
    ck = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 8 and ck["ForceFieldDataModule"]["position"] == 2 * 2 * 2  # 2 batches x 2 x 2 ranks
    resumed = torchrun("killed", None, True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        reference = _steps(tmp_path / f"ref_0_{rank}.jsonl")
        before = _steps(tmp_path / f"killed_0_{rank}.jsonl")
        after = _steps(tmp_path / f"killed_1_{rank}.jsonl")
        assert [s["step"] for s in reference] == list(range(18))
        assert [s["step"] for s in before] == list(range(9))
        assert before[:8] + after == reference, rank
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 18
    for key in ("state_dict", "current_model_state"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


def test_checkpoint_intervals_make_mid_epoch_checkpoint_callbacks(tmp_path, morse_file):
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = _config(tmp_path, morse_file, tmp_path / "run", **{"trainer.checkpoint_every_minutes": 20})
    checkpoints = [c for c in run_module._trainer(cfg, tmp_path / "run").callbacks if isinstance(c, ModelCheckpoint)]
    best, steps, minutes = checkpoints
    assert best.monitor == "val/loss" and best.save_last
    assert steps._every_n_train_steps == 2 and steps.save_top_k == 0 and steps.save_last
    assert minutes._train_time_interval == timedelta(minutes=20) and minutes.save_last
    plain = _config(tmp_path, morse_file, tmp_path / "run", **{"trainer.checkpoint_every_n_steps": None})
    assert len([c for c in run_module._trainer(plain, tmp_path / "run").callbacks if isinstance(c, ModelCheckpoint)]) == 1
    from forcecentric.config import preset_path

    assert load_run_config(preset_path("pretrain"), {}).trainer.checkpoint_every_minutes == 30


def test_resume_takes_the_newer_of_last_and_slurm_checkpoints(tmp_path):
    """SLURM's SIGUSR1 warning makes Lightning save RUN/hpc_ckpt_N.ckpt before the job ends; the
    resume takes whichever of it and checkpoints/last.ckpt is newer."""
    from forcecentric.train.run import resume_checkpoint

    assert resume_checkpoint(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resume_checkpoint(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"y")
    os.utime(last, ns=(10**18, 10**18))
    os.utime(hpc, ns=(2 * 10**18, 2 * 10**18))
    assert resume_checkpoint(tmp_path) == hpc
    os.utime(last, ns=(3 * 10**18, 3 * 10**18))
    assert resume_checkpoint(tmp_path) == last
    # a last-v1.ckpt that older code left beside last.ckpt counts when newer; other names do not
    v1 = tmp_path / "checkpoints" / "last-v1.ckpt"
    v1.write_bytes(b"z")
    os.utime(v1, ns=(4 * 10**18, 4 * 10**18))
    assert resume_checkpoint(tmp_path) == v1
    other = tmp_path / "checkpoints" / "last_good_copy.ckpt"
    other.write_bytes(b"w")
    os.utime(other, ns=(5 * 10**18, 5 * 10**18))
    assert resume_checkpoint(tmp_path) == v1


def test_checkpoint_callbacks_share_one_last_ckpt_even_when_added_on_resume(tmp_path, morse_file):
    """The validation checkpoint and the step checkpoint both write checkpoints/last.ckpt. With
    Lightning's version counter, the second writer found the file and wrote last-v1.ckpt, and a
    run that gained step checkpoints on resume kept its mid-epoch state where --resume did not
    look. Now there is one last.ckpt, at the run's last step."""
    fresh = _config(tmp_path, morse_file, tmp_path / "fresh", **{"trainer.max_epochs": 2})
    run_module.run(fresh)
    ckpts = tmp_path / "fresh" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 12

    # started without step checkpoints, resumed with them for a third epoch
    run_dir = tmp_path / "grown"
    run_module.run(_config(tmp_path, morse_file, run_dir, **{"trainer.max_epochs": 2,
                                                               "trainer.checkpoint_every_n_steps": None}))
    grown = _config(tmp_path, morse_file, run_dir, **{"trainer.max_epochs": 3, "trainer.checkpoint_every_n_steps": 4})
    run_module.run(grown, resume=True)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 18


def test_resume_warns_only_about_real_config_changes(tmp_path, morse_file, caplog):
    """A run started before a config key existed resumes without a spurious 'config differs';
    a real change is named."""
    import logging

    cfg = _config(tmp_path, morse_file, tmp_path / "run", **{"trainer.max_epochs": 1,
                                                               "trainer.checkpoint_every_n_steps": None})
    run_module.run(cfg)
    saved = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["trainer"]["checkpoint_every_n_steps"], old["data"]["node_local_shards"]  # keys added since
    saved.write_text(yaml.safe_dump(old))
    with caplog.at_level(logging.WARNING, logger="forcecentric"):
        run_module.run(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_epochs": 2})}),
                       resume=True)
    differs = [r.getMessage() for r in caplog.records if "config differs" in r.getMessage()]
    assert differs == ["config differs from the one the run started with in trainer.max_epochs; using the new one"]


def test_sigkill_mid_epoch_resumes_exactly_with_gradient_accumulation(tmp_path, morse_file, monkeypatch):
    """Two batches per optimizer step, a checkpoint after every step: the kill lands after step 5
    (epoch 1, 4 of its 6 batches); the resumed batches and final weights are the reference's."""
    over = {"trainer.accumulate_grad_batches": 2, "trainer.checkpoint_every_n_steps": 1}
    monkeypatch.setattr(run_module, "_trainer", with_probe(Probe(tmp_path / "ref.jsonl")))
    run_module.run(_config(tmp_path, morse_file, tmp_path / "ref", **over))
    cfg = _config(tmp_path, morse_file, tmp_path / "killed", **over)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = KILLER.format(tests=str(TESTS), cfg=str(tmp_path / "cfg.yaml"), log=str(tmp_path / "killed.jsonl"),
                           kill_at=5, resume=False)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ck = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert (ck["epoch"], ck["global_step"], ck["ForceFieldDataModule"]["batches"]) == (1, 5, 4)
    monkeypatch.setattr(run_module, "_trainer", with_probe(Probe(tmp_path / "resumed.jsonl")))
    run_module.run(cfg, resume=True)
    reference, killed = _steps(tmp_path / "ref.jsonl"), _steps(tmp_path / "killed.jsonl")
    resumed = _steps(tmp_path / "resumed.jsonl")
    assert len(reference) == 18 and len(killed) == 10 and len(resumed) == 8
    assert killed + resumed == reference
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("state_dict", "current_model_state"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
