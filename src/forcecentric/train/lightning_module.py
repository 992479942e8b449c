"""Lightning modules: the force-centric objective around a plain ``ForceField``, and the
property-prediction objective around a ``PropertyModel``; both share the optimizer, the
learning-rate schedule with warm-up and the checkpoint metadata."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from ..config import RunConfig
from ..data.dataset import Batch
from ..errors import TrainingDivergedError
from ..nn.model import ForceField
from ..nn.properties import TARGETS, PropertyModel
from ..objectives import make_views, total_loss


def cosine_factor(step: int, total: int, warmup: int, floor: float, time_used: float = 0.0) -> float:
    """Learning-rate factor of the cosine schedule after warm-up: from 1 down to ``floor`` as
    the progress goes from 0 to 1, the progress being the larger of the fraction of steps done and
    the fraction ``time_used`` of a wall-time budget."""
    if step < warmup:
        return 1.0
    t = min(1.0, max((step - warmup) / max(1, total - warmup), time_used))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


class _TrainingModule(pl.LightningModule):
    """Optimizer, schedule, warm-up and checkpoint metadata shared by the training tasks."""

    def __init__(self, config: RunConfig, model: torch.nn.Module):
        super().__init__()
        self.config = config
        self.model = model
        self.save_hyperparameters({"config": config.model_dump(mode="json")})
        # L2-SP anchors: the representation's weights as the run starts from init_from. Buffers of
        # this module (not of the model, which is exported without them), saved in the training
        # checkpoints, so a resumed run keeps pulling toward the pre-trained weights
        self._anchored: list[tuple[torch.nn.Parameter, str]] = []
        if config.optim.l2sp > 0:
            for name, p in self._trainable(representation=True):
                buf = "l2sp_anchor__" + name.replace(".", "__")
                self.register_buffer(buf, p.detach().clone())
                self._anchored.append((p, buf))

    def _trainable(self, representation: bool | None = None) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's trainable parameters by name: all of them, or (``representation`` True /
        False) those of the ET representation / every other one (the heads)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad
                and (representation is None or n.startswith("representation.") == representation)]

    # ------------------------------------------------------------ distribution
    @property
    def world_size(self) -> int:
        """Processes of the run (1 when not attached to a Trainer)."""
        return int(self._trainer.world_size) if self._trainer is not None else 1

    def train_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """The random numbers of one training batch (the denoising noise), seeded from
        ``(seed, rank, epoch, batch)``: a function of where the run stands, not of what ran
        before in this process, so a run resumed from a checkpoint draws the noise the
        uninterrupted run would have drawn, and DDP ranks draw different noise for their
        different conformations."""
        key = np.random.SeedSequence([self.config.seed, self.global_rank, self.current_epoch, batch_idx])
        return torch.Generator(device=device).manual_seed(int(key.generate_state(1, dtype=np.uint64)[0] >> 1))

    def _every_parameter(self, loss: torch.Tensor) -> torch.Tensor:
        """Under DDP: ``loss + 0 * sum(parameters)``, so that every trainable parameter gets a
        gradient (zeros where the loss does not depend on it) in every step. DDP all-reduces the
        gradients only once every parameter's gradient hook has fired; force-matching losses
        leave some parameters without a gradient (the energy head's last bias only shifts the
        energy, an unused denoising head, ...), and then DDP silently skips the averaging (each
        rank takes its own step) or fails on the next step. This is cheaper than DDP's
        ``find_unused_parameters`` graph search and holds whichever way the strategy was chosen
        (``auto``, ``ddp``, torchrun). One process: the loss is returned unchanged."""
        if self.world_size <= 1:
            return loss
        touch = sum(p.sum() for p in self.parameters() if p.requires_grad)
        return loss + 0.0 * touch

    def _weight(self, count: int) -> int | float:
        """The ``batch_size`` (weight) of a logged mean. Under DDP a float: Lightning sums the
        weights of each rank in an integer tensor and averages that across ranks in place
        (``lightning.fabric.utilities.distributed._sync_ddp``), which truncates as soon as ranks
        hold different counts (validation shards of 3 and 2 frames give 2, not 2.5) and biases
        the reduced mean; a float weight keeps the reduction exact: sum(value * w) / sum(w) over
        all ranks. One process: the integer, as before."""
        return float(count) if self.world_size > 1 else int(count)

    def _log_term(self, stage: str, name: str, value: torch.Tensor, batch_size: int, prog_bar: bool = False) -> None:
        """Log one loss term. Training: ``train/NAME_step`` (this rank's value, every step, no
        communication) and ``train/NAME_epoch`` (the mean over the epoch's batches of all ranks,
        weighted by batch size, reduced across ranks once at the end of the epoch). Validation:
        ``val/NAME``, the epoch mean reduced across ranks."""
        if stage == "train":
            self.log(f"train/{name}_step", value, batch_size=batch_size, prog_bar=prog_bar, on_step=True,
                     on_epoch=False)
            self.log(f"train/{name}_epoch", value, batch_size=self._weight(batch_size), prog_bar=prog_bar,
                     on_step=False, on_epoch=True, sync_dist=True)
        else:
            self.log(f"{stage}/{name}", value, batch_size=self._weight(batch_size), prog_bar=prog_bar,
                     on_epoch=True, sync_dist=True)

    def _check_finite(self, terms: dict[str, torch.Tensor], stage: str) -> None:
        if not torch.isfinite(terms["loss"]):
            bad = {k: float(v.detach()) for k, v in terms.items()}
            raise TrainingDivergedError(
                f"{stage} loss became non-finite at epoch {self.current_epoch}, step "
                f"{self.global_step}: {bad}. No checkpoint was written for this state; lower "
                "optim.lr, enable optim.gradient_clip, or check the data for outliers."
            )

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        o = self.config.optim
        groups = self.param_groups()
        opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        if o.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=o.plateau_factor, patience=o.plateau_patience,
                min_lr=[o.min_lr * g["lr_factor"] for g in groups],
            )
            self._warm_up(opt, 0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss",
                                                       "interval": "epoch", "strict": False}}
        if o.schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = o.warmup_steps
            # with a wall-time budget the cosine follows whichever runs out first, steps or time,
            # so a time-capped run still ends at min_lr. The time is Lightning's Timer's (the one
            # that enforces max_time): it is saved in checkpoints, so --resume continues the
            # schedule where it stood instead of restarting the clock
            budget = self.config.trainer.max_time_minutes

            def factor(step: int) -> float:
                used = self._train_seconds() / (60.0 * budget) if budget else 0.0
                if budget and self.world_size > 1:
                    # DDP: rank 0's clock for everyone, so all replicas keep the same learning
                    # rate (and the same weights); every rank steps its scheduler alike
                    used = float(self.trainer.strategy.broadcast(used, src=0))
                # the warm-up ramp is part of the schedule too, so that the rate the scheduler leaves
                # after each step (what the rate monitor logs) is the one the next step uses
                ramp = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
                return ramp * cosine_factor(step, total, warm, o.min_lr / o.lr, used)

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            self._warm_up(opt, 0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        self._warm_up(opt, 0)
        return opt

    def _warm_up(self, optimizer, step: int) -> None:
        """The linear warm-up's rate for ``step`` on every parameter group (nothing after the
        warm-up). Also set once when the optimizer is made, so that what the rate monitor logs
        before the first step is the rate that step uses (a resumed run's saved rates replace it)."""
        o = self.config.optim
        if o.warmup_steps > 0 and step < o.warmup_steps:
            scale = (step + 1) / o.warmup_steps
            for group in optimizer.param_groups:
                group["lr"] = scale * o.lr * group.get("lr_factor", 1.0)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each with its ``lr_factor`` (its rate relative to
        ``optim.lr``): one group, or with ``optim.representation_lr_factor`` below 1 two, the ET
        representation's parameters at that factor and every other parameter (the heads) at 1."""
        o = self.config.optim
        if o.representation_lr_factor == 1.0:
            return [{"params": [p for _, p in self._trainable()], "lr": o.lr, "lr_factor": 1.0}]
        f = o.representation_lr_factor
        return [{"params": [p for _, p in self._trainable(False)], "lr": o.lr, "lr_factor": 1.0, "name": "heads"},
                {"params": [p for _, p in self._trainable(True)], "lr": o.lr * f, "lr_factor": f,
                 "name": "representation"}]

    def _train_seconds(self) -> float:
        """Training time so far, earlier runs of a resumed run included (Lightning's Timer)."""
        from lightning.pytorch.callbacks import Timer

        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        return timer.time_elapsed("train") if timer is not None else 0.0

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # linear warm-up on top of whichever schedule is active (as TorchMD-Net does)
        o = self.config.optim
        step = self.trainer.global_step
        self._warm_up(optimizer, step)
        if o.warmup_steps > 0 and step == o.warmup_steps and o.schedule != "cosine":
            for group in optimizer.param_groups:
                group["lr"] = o.lr * group.get("lr_factor", 1.0)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._anchored:
            self._pull_toward_anchors(optimizer)  # at this step's rate
        self._warm_up(optimizer, step + 1)  # the next step's rate, so that the monitor logs the rate in use

    @torch.no_grad()
    def _pull_toward_anchors(self, optimizer) -> None:
        """L2-SP, decoupled as AdamW decouples its weight decay: theta -= lr * l2sp * (theta - theta_0),
        with the learning rate of the parameter's own group."""
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for p, buf in self._anchored:
            p.sub_((p - getattr(self, buf)) * (lr_of[id(p)] * self.config.optim.l2sp))

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # metadata that lets forcecentric.load() read this Lightning checkpoint on its own
        from ..checkpoint import model_payload

        checkpoint["forcecentric"] = model_payload(self.model, task=self.config.task)


class ForceFieldModule(_TrainingModule):
    """Trains a :class:`ForceField` with force matching, zero-force regularization, denoising
    and (optionally) an energy term. Validation reports each loss term plus force and energy MAE.
    """

    def __init__(self, config: RunConfig, model: ForceField | None = None):
        super().__init__(config, model if model is not None else ForceField(config.model))

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Batch, stage: str, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        batch = batch.to(dtype=self.dtype) if batch.pos.dtype != self.dtype else batch
        views = make_views(batch, self.config.loss, generator)
        b = views.batch
        out = self.model(b.z, b.pos, b.batch, b.n_graphs, compute_forces=True, create_graph=stage == "train")
        terms = total_loss(out, views, self.config.loss)
        self._check_finite(terms, stage)
        n = batch.n_graphs
        for name, value in terms.items():
            self._log_term(stage, name, value.detach(), n, prog_bar=name == "loss")
        if stage != "train":
            self._log_mae(out, views, stage, n)
        return terms

    def _log_mae(self, out, views, stage: str, n: int) -> None:
        b = views.batch
        fa = views.force_atoms
        # under DDP every rank must log the same keys (each is all-reduced at the epoch's end):
        # a rank whose shard has no labelled atoms logs 0 with weight 0
        every = self.world_size > 1
        if bool(fa.any()) or every:
            k = int(fa.sum())
            mae = (out["forces"][fa] - b.forces[fa]).abs().mean() if k else out["forces"].new_zeros(())
            self.log(f"{stage}/force_mae", mae, batch_size=self._weight(k), sync_dist=True)
        if self.config.loss.energy <= 0:  # energies not trained (pre-training): their MAE means nothing
            return
        eg = b.has_energy & ~b.equilibrium
        eg = eg & (torch.arange(b.n_graphs, device=eg.device) < n)
        if bool(eg.any()) or every:
            k = int(eg.sum())
            err = (out["energy"][eg].double() - b.energy[eg].double()).abs()
            self.log(f"{stage}/energy_mae", err.mean() if k else err.new_zeros(()), batch_size=self._weight(k),
                     sync_dist=True)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        gen = self.train_generator(batch.pos.device, batch_idx)
        return self._every_parameter(self._step(batch, "train", gen)["loss"])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # the same noise on every validation pass, so val/denoise is comparable across epochs
        gen = torch.Generator(device=batch.pos.device).manual_seed(self.config.seed + batch_idx)
        with torch.enable_grad():
            self._step(batch, "val", gen)


class PropertyModule(_TrainingModule):
    """Trains a :class:`PropertyModel` on molecular properties: per target the squared (or
    absolute) error divided by the target's spread on the training set, weighted and summed.
    Logs each target's loss and its MAE in the report unit (``val/gap_mae`` in meV, ...)."""

    def __init__(self, config: RunConfig, model: PropertyModel):
        super().__init__(config, model)
        names = model.targets
        weights = config.property.weights or {}
        self.register_buffer("weights", torch.tensor([float(weights.get(n, 1.0)) for n in names]), persistent=False)

    def _step(self, batch: tuple[Batch, torch.Tensor], stage: str) -> torch.Tensor:
        b, y = batch
        b = b.to(dtype=self.dtype) if b.pos.dtype != self.dtype else b
        out = self.model(b.z, b.pos, b.batch, b.n_graphs, charge=b.charge)
        names = self.model.targets
        pred = torch.stack([out[n] for n in names], dim=1)
        y = y.to(pred.dtype)
        err = (pred - y) / self.model.target_std.to(pred.dtype)
        per_target = err.abs().mean(0) if self.config.property.loss == "l1" else (err * err).mean(0)
        loss = (per_target * self.weights.to(per_target.dtype)).sum()
        terms = {"loss": loss}
        self._check_finite(terms, stage)
        n = b.n_graphs
        self._log_term(stage, "loss", loss.detach(), n, prog_bar=True)
        if stage != "train":
            for k, name in enumerate(names):
                mae = (pred[:, k] - y[:, k]).abs().mean() * TARGETS[name].report_factor
                self.log(f"{stage}/{name}_mae", mae, batch_size=self._weight(n), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._every_parameter(self._step(batch, "train"))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")
