"""Run a pre-training or fine-tuning job end to end.

One run directory holds the resolved ``config.yaml``, Lightning's ``metrics.csv``, the
``learning_curve.png``, ``checkpoints/`` (``last.ckpt`` for ``--resume``, the best one by
``val/loss``), the exported ``model.ckpt`` and ``metrics.json`` with validation and test errors.

Distributed runs (``trainer.devices`` x ``trainer.num_nodes`` processes, docs/distributed.md):
every process runs :func:`run`; rank 0 alone writes the run directory's files and, after
training, evaluates and exports; the other ranks return right after ``fit``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from .. import __version__
from ..checkpoint import load, save_model
from ..config import RunConfig
from ..errors import ConfigError
from ..evaluation import check_elements, evaluate, fit_atomrefs, write_json
from ..nn.model import ForceField
from .callbacks import AtomicCheckpointIO, EarlyStoppingAtMinLR, LearningCurvePlot, RunDirCSVLogger
from .datamodule import ForceFieldDataModule, dataset_elements, force_rms, sample_records
from .lightning_module import ForceFieldModule, PropertyModule

log = logging.getLogger("forcecentric")


def _init_model(cfg: RunConfig, dm: ForceFieldDataModule) -> ForceField:
    """Fresh weights, or the weights of ``cfg.init_from`` (representation and fitting heads)."""
    # statistics and reference-energy fits on (a sample of) the training set
    train = sample_records(dm.train_set, 20_000, cfg.seed)
    if cfg.init_from:
        base = load(cfg.init_from)
        model = ForceField(cfg.model)
        src = base.state_dict()
        dst = model.state_dict()
        # the representation must match; heads that differ (e.g. a new denoise head) start fresh
        _check_representation(base, cfg, cfg.init_from)
        loaded = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
        dst.update(loaded)
        model.load_state_dict(dst)
        model.elements = sorted(set(base.elements) | set(dataset_elements(dm.train_set)))
        model.metadata = {"pretrained_from": str(cfg.init_from), "pretraining_data": base.metadata.get("data")}
        log.info("initialised %d/%d tensors from %s", len(loaded), len(dst), cfg.init_from)
    else:
        torch.manual_seed(cfg.seed)
        model = ForceField(cfg.model)
        model.elements = dataset_elements(dm.train_set)
        model.metadata = {}
        rms = force_rms(train)
        model.set_normalization(scale=rms if rms else 1.0, shift=0.0)
    if cfg.fit_energy_reference and any(r.energy is not None for r in train):
        if cfg.init_from is None:
            model.set_normalization(atomref=torch.zeros_like(model.atomref))
        refs = fit_atomrefs(model, train)
        new = model.atomref.clone()
        for z, v in refs.items():
            new[z] += v
        model.set_normalization(atomref=new)
        log.info("fitted reference energies (eV): %s", refs)
    return model


_REPRESENTATION_KEYS = ("hidden_channels", "num_layers", "num_heads", "num_rbf", "cutoff", "max_z",
                        "neighbor_embedding", "vector_cutoff", "activation", "attn_activation")


def _check_representation(base, cfg: RunConfig, path: str) -> None:
    """The checkpoint's representation hyper-parameters equal the run's (else ConfigError)."""
    mismatch = {k for k in _REPRESENTATION_KEYS if getattr(base.config, k) != getattr(cfg.model, k)}
    if mismatch:
        raise ConfigError(
            f"model config differs from the checkpoint {path!r} in {sorted(mismatch)}: "
            f"checkpoint has {base.config.model_dump()}"
        )


def _load_representation(model, path: str, cfg: RunConfig) -> int:
    """Copy the ET representation weights of the checkpoint ``path`` into ``model``; heads start
    fresh. Returns the number of tensors copied."""
    base = load(path)
    _check_representation(base, cfg, path)
    src = {k: v for k, v in base.state_dict().items() if k.startswith("representation.")}
    missing, unexpected = model.load_state_dict(src, strict=False)
    if unexpected or any(k.startswith("representation.") for k in missing):
        raise ConfigError(f"the representation in {path!r} does not fit the model: {unexpected or missing}")
    model.elements = sorted(set(base.elements))
    model.metadata = {"pretrained_from": str(path), "pretraining_data": base.metadata.get("data")}
    return len(src)


def _init_property_model(cfg: RunConfig, dm: ForceFieldDataModule):
    """A PropertyModel for ``cfg.property.targets``: the representation from ``cfg.init_from``
    (or fresh), new heads, priors fitted on the training targets."""
    from ..nn.properties import PropertyModel
    from ..properties import fit_priors

    torch.manual_seed(cfg.seed)
    model = PropertyModel(cfg.model, cfg.property.targets)
    model.elements, model.metadata = [], {}
    if cfg.init_from:
        n = _load_representation(model, cfg.init_from, cfg)
        log.info("initialised %d representation tensors from %s", n, cfg.init_from)
    model.elements = sorted(set(model.elements) | set(dataset_elements(dm.train_set)))
    fitted = fit_priors(model, sample_records(dm.train_set, 100_000, cfg.seed))
    model.metadata["priors"] = fitted
    log.info("fitted property priors: %s", fitted)
    return model


def global_batch_size(cfg: RunConfig, world_size: int) -> int:
    """Conformations per optimizer step: ``data.batch_size`` is per process (device), so the
    global batch is ``batch_size * world_size * accumulate_grad_batches`` with
    ``world_size = devices * num_nodes``."""
    return int(cfg.data.batch_size) * int(world_size) * int(cfg.trainer.accumulate_grad_batches)


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun's RANK, SLURM_PROCID,
    Lightning's LOCAL_RANK for the processes it starts itself), before any process group
    exists; 0 for a plain single-process run."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _trainer(cfg: RunConfig, run_dir: Path) -> pl.Trainer:
    from lightning.pytorch.callbacks import (EarlyStopping, EMAWeightAveraging, LearningRateMonitor,
                                             ModelCheckpoint, TQDMProgressBar)

    t = cfg.trainer
    # every checkpoint callback writes the one last.ckpt: with Lightning's version counter on, a
    # callback that finds last.ckpt written by another writes last-v1.ckpt instead, and the
    # two then alternate (a resume from last.ckpt could lose up to an epoch)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss",
                        mode="min", save_top_k=1, save_last=True, enable_version_counter=False),
        LearningRateMonitor(logging_interval="epoch"),
        LearningCurvePlot(run_dir),
    ]
    # mid-epoch last.ckpt (the callback above writes it at the end of every validation); the
    # datamodule's state in it says how far into its epoch the run was
    if t.checkpoint_every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                         every_n_train_steps=t.checkpoint_every_n_steps,
                                         enable_version_counter=False))
    if t.checkpoint_every_minutes:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                         train_time_interval=timedelta(minutes=t.checkpoint_every_minutes),
                                         enable_version_counter=False))
    if t.early_stopping_patience is not None:
        # strict=False: a resumed epoch end has no metrics yet
        stop = dict(monitor="val/loss", mode="min", patience=t.early_stopping_patience, strict=False)
        callbacks.append(EarlyStoppingAtMinLR(min_lr=cfg.optim.min_lr, **stop) if t.early_stopping_at_min_lr
                         else EarlyStopping(**stop))
    if cfg.optim.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)))

    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time={"minutes": t.max_time_minutes} if t.max_time_minutes else None,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.lightning_precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        # the datamodule builds its own per-rank samplers (no padding duplicates, weighted by
        # source where asked); Lightning must not replace them with DistributedSampler
        use_distributed_sampler=False,
        gradient_clip_val=cfg.optim.gradient_clip,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        callbacks=callbacks,
        logger=RunDirCSVLogger(run_dir),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        inference_mode=False,  # validation needs autograd for the forces
        deterministic=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest of ``checkpoints/last.ckpt`` and the
    checkpoints Lightning writes as ``hpc_ckpt_N.ckpt`` when SLURM warns a job with SIGUSR1
    before ending it (``#SBATCH --signal=SIGUSR1@120``); None when the run has neither. A
    ``last-vN.ckpt`` beside ``last.ckpt`` counts too: Lightning's version counter wrote those
    when two checkpoint callbacks saved "last" (fixed since, but runs made before hold them)."""
    found = [p for p in [*(run_dir / "checkpoints").glob("last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
             if p.is_file() and re.fullmatch(r"last(-v\d+)?|hpc_ckpt_\d+", p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def run(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train according to ``cfg``; return the final metrics (also written to ``metrics.json``)."""
    property_task = cfg.task == "property"
    if property_task:  # before anything is written
        from ..properties import check_targets, evaluate_properties

        check_targets(cfg.property.targets)
    run_dir = Path(cfg.run_dir)
    last = resume_checkpoint(run_dir)
    if resume:
        if last is None:
            raise ConfigError(f"--resume: no checkpoint {str(run_dir / 'checkpoints' / 'last.ckpt')!r} "
                              "to resume from")
        saved = run_dir / "config.yaml"
        if saved.is_file():
            old = yaml.safe_load(saved.read_text())
            try:  # with today's defaults filled in: keys added since the run started are no change
                old = RunConfig.model_validate(old).model_dump(mode="json")
            except Exception:  # noqa: BLE001 - a key since removed: compare as written
                pass
            new = cfg.model_dump(mode="json")
            if old != new:
                changed = sorted(_changed_keys(old, new))
                log.warning("config differs from the one the run started with in %s; using the new one",
                            ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""))
    elif last is not None:
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it or "
            "choose another run_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if _launch_rank() == 0:  # distributed launches: every process runs this function
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # expected situations in this workflow, not problems: small datasets, reused run dirs on resume
    # (the datamodule's state in every checkpoint resumes an interrupted epoch; Lightning, which
    # looks for that state on the DataLoader only, would warn that it cannot)
    for msg in ("The number of training batches", "Experiment logs directory", "Checkpoint directory",
                "`isinstance\\(treespec, LeafSpec\\)`", "litlogger", "You're resuming from a checkpoint that ended"):
        warnings.filterwarnings("ignore", message=f".*{msg}")
    if resume:  # the epoch end a checkpoint was written at has no validation metrics in the new process
        warnings.filterwarnings("ignore", message=r".*ModelCheckpoint\(monitor='val/loss'\)` could not find")
    t0 = time.time()

    dm = ForceFieldDataModule(cfg.data, seed=cfg.seed, properties=cfg.property.targets if property_task else None)
    dm.setup("fit")
    model = _init_property_model(cfg, dm) if property_task else _init_model(cfg, dm)
    model.metadata["data"] = dm.describe()
    module = PropertyModule(cfg, model) if property_task else ForceFieldModule(cfg, model)
    trainer = _trainer(cfg, run_dir)
    if trainer.is_global_zero and trainer.world_size > 1:
        log.info("distributed run: %d processes, global batch %d (%d per process x %d processes x %d accumulated)",
                 trainer.world_size, global_batch_size(cfg, trainer.world_size), cfg.data.batch_size,
                 trainer.world_size, cfg.trainer.accumulate_grad_batches)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    world = int(trainer.world_size)
    if not trainer.is_global_zero:
        # DDP: rank 0 alone evaluates and writes model.ckpt and metrics.json (Lightning already
        # wrote checkpoints from rank 0 only); the other ranks are done, with no collective left
        return {"task": cfg.task, "run_dir": str(run_dir), "global_rank": int(trainer.global_rank),
                "world_size": world}

    # best weights (EMA weights when EMA is on) -> self-contained model.ckpt
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    final = load(best) if best else module.model.eval()
    final.metadata = dict(model.metadata)
    final.elements = list(model.elements)
    dtype = torch.float64 if cfg.trainer.precision == "64" else torch.float32
    final = final.to(dtype)
    metrics: dict[str, Any] = {
        "task": cfg.task,
        "run_dir": str(run_dir),
        "epochs": int(trainer.current_epoch),
        "global_steps": int(trainer.global_step),
        "wall_time_s": round(time.time() - t0, 1),
        "num_parameters": sum(p.numel() for p in final.parameters()),
        "package_version": __version__,
        "train_size": len(dm.train_set),
        # data.batch_size is per process: one optimizer step sees batch_size x processes x accumulation
        "world_size": world,
        "batch_size_per_device": cfg.data.batch_size,
        "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "global_batch_size": global_batch_size(cfg, world),
        "precision": cfg.trainer.precision,
        "init_from": cfg.init_from,  # the weights the run started from (None: random)
    }
    if property_task:
        metrics["targets"] = list(cfg.property.targets)
    score = evaluate_properties if property_task else evaluate
    metrics["val"] = score(final, sample_records(dm.val_set, 20_000), run_dir, name="val")
    if len(dm.test_set):
        test_records = sample_records(dm.test_set, 100_000 if property_task else 20_000)
        check_elements(final, test_records)
        metrics["test"] = score(final, test_records, run_dir, name="test")
    final.metadata["metrics"] = {k: metrics[k] for k in ("val", "test") if k in metrics}
    save_model(final, run_dir / "model.ckpt", task=cfg.task, seed=cfg.seed)
    write_json(metrics, run_dir / "metrics.json")
    (run_dir / "summary.txt").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
