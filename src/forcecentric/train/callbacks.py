"""Callbacks beyond Lightning's own: the learning-curve PNG, a CSV logger that appends on resume,
atomic checkpoint writes, early stopping that waits for the learning-rate floor."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class EarlyStoppingAtMinLR(EarlyStopping):
    """Early stopping whose patience may end the run only once the learning rate is at ``min_lr``.

    With a plateau schedule, plain early stopping fires ``patience`` epochs after the last
    improvement whatever the rate is then: a run whose validation loss is noisy at a high rate
    (a large fine-tuning rate, a pre-trained start that first drifts) stops before the schedule
    has annealed it. Here the epochs without improvement are counted as usual, but the stop waits
    until the plateau schedule has reached its floor; a non-finite monitored value still stops
    at once."""

    def __init__(self, min_lr: float, **kwargs):
        super().__init__(**kwargs)
        self.min_lr = min_lr
        self._at_floor = False

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        self._at_floor = bool(lrs) and max(lrs) <= self.min_lr * (1.0 + 1e-6)
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current):
        before = getattr(self, "stopping_reason", None)  # Lightning >= 2.6 records why it stopped
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        # no threshold is set here, so a finite value stops only for want of patience: hold it back
        if should_stop and bool(torch.isfinite(current)) and not self._at_floor:
            if before is not None:
                self.stopping_reason = before
            return False, None
        return should_stop, reason


class LearningCurvePlot(pl.Callback):
    """Redraws ``learning_curve.png`` in the run directory from the CSV metrics: after a
    validation epoch at most every ``min_interval_s`` seconds (drawing costs more than a short
    epoch of a small fine-tuning set), and always when training ends."""

    def __init__(self, run_dir: str | Path, min_interval_s: float = 30.0):
        self.run_dir = Path(run_dir)
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def _draw(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        from ..plots import learning_curve

        for logger in trainer.loggers:
            if hasattr(logger, "save"):
                logger.save()
        learning_curve(self.run_dir / "metrics.csv", self.run_dir / "learning_curve.png")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and time.monotonic() - self._last >= self.min_interval_s:
            self._draw(trainer)
            self._last = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer)


class RunDirCSVLogger(CSVLogger):
    """Lightning's CSV logger writing ``metrics.csv`` straight into the run directory and
    appending to it on ``--resume`` (Lightning's own writer deletes an existing file)."""

    def __init__(self, run_dir: str | Path):
        super().__init__(save_dir=str(run_dir), name="", version="")
        self._run_dir = str(run_dir)

    @property
    def log_dir(self) -> str:
        return self._run_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            Path(self._run_dir).mkdir(parents=True, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self._run_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # keep earlier rows; continue with the existing header
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = list(header)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes Lightning checkpoints to a temporary file and renames it into place, so a run
    killed while saving (or a full disk) never leaves a truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from ..checkpoint import atomic_torch_save

        atomic_torch_save(checkpoint, path)
