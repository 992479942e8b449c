"""Typed configuration objects.

Configs are YAML files validated into these pydantic models. Unknown keys and wrong types raise a
:class:`~forcecentric.errors.ConfigError` that names the file and the offending key. Every run
writes its resolved config next to its results, and checkpoints store the model config so that
``forcecentric.load`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


#: Folder of the YAML presets shipped with the package (``-c NAME`` finds ``NAME.yaml`` there).
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_path(spec: str) -> Path:
    """A config file path, or the path of the shipped preset called ``spec``."""
    p = Path(spec)
    if p.is_file():
        return p
    cand = PRESETS_DIR / f"{spec}.yaml"
    if cand.is_file():
        return cand
    presets = sorted(x.stem for x in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"config {spec!r} is neither a file nor a preset; presets: {presets}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Hyper-parameters of the Equivariant Transformer force field (TorchMD-Net ET)."""

    hidden_channels: int = Field(128, gt=0, description="feature size F of scalars and vectors")
    num_layers: int = Field(6, gt=0, description="number of equivariant attention layers")
    num_heads: int = Field(8, gt=0, description="attention heads; must divide hidden_channels")
    num_rbf: int = Field(32, gt=0, description="exponential-normal radial basis functions")
    cutoff: float = Field(5.0, gt=0, description="radial cutoff in Angstrom (cosine cutoff)")
    max_z: int = Field(100, gt=0, description="largest atomic number the embedding can hold")
    activation: Literal["silu", "ssp", "tanh", "gelu"] = "silu"
    attn_activation: Literal["silu", "ssp", "tanh", "gelu"] = "silu"
    neighbor_embedding: bool = True
    vector_cutoff: bool = Field(
        True, description="multiply vector messages by the cosine cutoff (smooth forces at r_c)"
    )
    denoise_head: bool = Field(
        False,
        description="add a separate equivariant head that predicts the denoising target "
        "(instead of denoising through the force output)",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_channels % self.num_heads != 0:
            raise ValueError(
                f"hidden_channels ({self.hidden_channels}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        return self


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  '{loc}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate(model_cls: type[BaseModel], data: dict[str, Any], source: str = "<dict>") -> Any:
    """Validate ``data`` into ``model_cls`` raising :class:`ConfigError` with every problem."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


class DenoiseConfig(_Strict):
    """Force-based denoising on equilibrium conformations.

    ``x~ = x0 + sigma * eps`` with ``eps ~ N(0, I)``; the target is ``-kappa * u`` where ``u`` is
    ``x~ - x0`` (``target: harmonic``, kappa in eV/A^2: the restoring force of an isotropic
    harmonic well around the minimum), ``eps`` (``target: eps``, the coordinate-denoising target of
    Zaidi et al.) or ``eps / sigma^2`` (``target: eps_over_sigma2``, the Gaussian score scale).
    The paper leaves the scale open; the presets use harmonic with sigma = 0.05 A and
    kappa = 20 eV/A^2, so the target's per-component RMS (1 eV/A) matches thermal forces.
    """

    sigma: float = Field(0.05, gt=0, description="noise standard deviation in Angstrom")
    target: Literal["harmonic", "eps", "eps_over_sigma2"] = "harmonic"
    kappa: float = Field(20.0, gt=0, description="scale of the target (eV/A^2 for harmonic)")
    through: Literal["forces", "head"] = Field(
        "forces",
        description="'forces': the target is matched by the model's forces -dE/dx; 'head': by "
        "a separate equivariant denoising head on the shared representation",
    )


class LossConfig(_Strict):
    """Weights of the force-centric objective; a zero weight switches a term off."""

    force: float = Field(1.0, ge=0, description="force matching on off-equilibrium samples")
    zero_force: float = Field(0.1, ge=0, description="zero-force regularization on minima")
    denoise: float = Field(0.1, ge=0, description="force-based denoising on minima")
    energy: float = Field(0.0, ge=0, description="per-atom energy MSE where energies exist")
    denoising: DenoiseConfig = Field(default_factory=DenoiseConfig)


class DataConfig(_Strict):
    """Where the conformations come from and how they are split."""

    train: list[str] = Field(default_factory=list, description="files (or 'bundled:NAME')")
    val: list[str] = Field(default_factory=list, description="optional separate validation files")
    test: list[str] = Field(default_factory=list, description="optional separate test files")
    format: str | None = Field(None, description="force a reader format (default: guess)")
    n_train: int | float | None = Field(None, description="count or fraction; None: the rest")
    n_val: int | float = Field(0.1, description="count or fraction taken from train when val empty")
    n_test: int | float | None = Field(
        0, description="count or fraction taken from train when test empty; None: the rest after n_train and "
        "n_val (e.g. the standard QM9 split 110,000 / 10,000 / rest)"
    )
    split_by_molecule: bool = Field(False, description="keep each molecule in one split only")
    source_weights: dict[str, float] | None = Field(
        None, description="relative sampling weight per source name (None: uniform over conformations)"
    )
    equilibrium_only_molecules: float | None = Field(
        None, ge=0, le=1,
        description="fraction of the training molecules (picked by a hash of mol_id) that keep only their "
        "minima: their off-equilibrium frames are dropped from the training split, as for molecules known "
        "only at equilibrium (the paper's PCQM4Mv2 part)",
    )
    batch_size: int = Field(16, gt=0)
    val_batch_size: int | None = None
    num_workers: int = Field(0, ge=0)
    max_force: float | None = Field(None, description="drop frames with |F| above this (eV/A)")
    skip_bad_shards: bool = Field(
        False, description="stores: leave out (with a warning naming each) shards that are missing, truncated or "
        "corrupted instead of stopping with an error"
    )
    node_local_shards: bool = Field(
        False, description="multi-node training from stores: shard s of the training stores (numbered in the order "
        "of data.train) is read by node s mod num_nodes only, so each node can keep its shards on local disk "
        "(forcecentric stage-shards); see docs/scale.md"
    )


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    plateau_patience: int = Field(5, ge=0, description="epochs without improvement before decay")
    plateau_factor: float = Field(0.7, gt=0, lt=1)
    min_lr: float = Field(1e-6, ge=0)
    gradient_clip: float | None = Field(10.0, description="max gradient norm (None: off)")
    ema_decay: float | None = Field(0.99, description="EMA of weights (None: off)")
    representation_lr_factor: float = Field(
        1.0, gt=0, le=1, description="learning rate of the ET representation relative to optim.lr (the "
        "heads train at optim.lr): below 1 when fine-tuning a pre-trained model, so that the first "
        "steps at a rate suited to the new heads do not wash out the pre-trained representation. "
        "Warm-up and schedules scale both rates alike; min_lr is the heads' floor and the "
        "representation's floor is min_lr times this factor"
    )
    l2sp: float = Field(
        0.0, ge=0, description="L2-SP: a decoupled weight decay that pulls the ET representation toward its "
        "pre-trained weights (init_from) instead of toward zero: after each step "
        "theta -= lr * l2sp * (theta - theta_pretrained). Needs init_from"
    )


#: ``trainer.precision`` -> Lightning's precision setting.
PRECISIONS = {"32": "32-true", "64": "64-true", "bf16-mixed": "bf16-mixed"}


class TrainerConfig(_Strict):
    """How Lightning runs the training: length, hardware, distribution and precision.

    Distributed data-parallel training (docs/distributed.md): ``devices`` processes per node
    times ``num_nodes`` nodes, each with its own share of every epoch. ``data.batch_size`` is the
    batch of ONE process, so the global batch of one optimizer step is
    ``data.batch_size * devices * num_nodes * accumulate_grad_batches`` (``metrics.json`` reports
    it as ``global_batch_size``).
    """

    max_epochs: int = Field(100, gt=0)
    max_steps: int = Field(-1, description="-1: no step limit")
    max_time_minutes: float | None = Field(
        None, description="stop after this wall time (a cosine schedule then anneals by time or steps, "
        "whichever runs out first)"
    )
    early_stopping_patience: int | None = Field(20, description="epochs (None: off)")
    early_stopping_at_min_lr: bool = Field(
        False, description="stop only once the plateau schedule has brought the learning rate down to "
        "optim.min_lr (and validation has not improved for early_stopping_patience epochs): every run "
        "anneals fully, however noisy its validation loss at the higher rates"
    )
    accelerator: str = Field("auto", description="cpu, gpu, cuda, mps or auto")
    devices: int | str = Field(
        "auto", description="processes (GPUs) per node; an int, 'auto', or a list string like '0,1'"
    )
    num_nodes: int = Field(1, gt=0, description="nodes of a multi-node (torchrun / SLURM) run")
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true"] = Field(
        "auto",
        description="Lightning strategy. auto: one process unless devices/num_nodes ask for more, then DDP; "
        "ddp: DistributedDataParallel, one process per device, started by torchrun, SLURM's srun, or by "
        "Lightning itself on one node; ddp_find_unused_parameters_true: DDP that also searches the graph for "
        "unused parameters (not needed: training gives every parameter a gradient under DDP)",
    )
    accumulate_grad_batches: int = Field(
        1, gt=0, description="batches per process whose gradients make one optimizer step (their mean)"
    )
    precision: Literal["32", "64", "bf16-mixed"] = Field(
        "32", description="'32' (float32), '64' (float64) or 'bf16-mixed' (bfloat16 autocast, float32 weights)"
    )
    log_every_n_steps: int = Field(10, gt=0)
    check_val_every_n_epoch: int = Field(1, gt=0)
    checkpoint_every_n_steps: int | None = Field(
        None, gt=0, description="also write checkpoints/last.ckpt every this many optimizer steps, in the middle "
        "of epochs, so a killed run loses at most that much (--resume continues the epoch where it stood)"
    )
    checkpoint_every_minutes: float | None = Field(
        None, gt=0, description="the same every this many minutes of training (both may be set)"
    )
    progress_bar: bool = True

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_str(cls, v: Any) -> Any:
        # YAML and --set read 32 / 64 as integers
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @property
    def lightning_precision(self) -> str:
        return PRECISIONS[self.precision]


class PropertyConfig(_Strict):
    """Molecular property prediction (``task: property``): which targets and how they are fitted."""

    targets: list[str] = Field(
        default_factory=list,
        description="QM9-style targets read from each record's properties: mu, alpha, homo, lumo, gap, r2, "
        "zpve, U0, U, H, G, Cv (several: multi-target training)",
    )
    loss: Literal["mse", "l1"] = Field("mse", description="per-target error, each divided by the target's spread")
    weights: dict[str, float] | None = Field(None, description="loss weight per target (default 1 each)")


class RunConfig(_Strict):
    """A whole pre-training, fine-tuning or property-prediction run."""

    task: Literal["pretrain", "finetune", "property"] = "pretrain"
    seed: int = 0
    run_dir: str = Field("runs/run", description="where config, metrics, plots, checkpoints go")
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    property: PropertyConfig = Field(default_factory=PropertyConfig)
    init_from: str | None = Field(
        None, description="checkpoint whose weights initialise the model (fine-tuning)"
    )
    fit_energy_reference: bool = Field(
        True,
        description="fit per-element reference energies on the training energies (least squares "
        "on the residual of the initial model) before training",
    )

    @model_validator(mode="after")
    def _min_lr_stop_needs_plateau(self) -> "RunConfig":
        if self.trainer.early_stopping_at_min_lr and (
                self.optim.schedule != "plateau" or self.trainer.early_stopping_patience is None):
            raise ValueError("trainer.early_stopping_at_min_lr needs optim.schedule: plateau and an "
                             f"early_stopping_patience (got schedule {self.optim.schedule!r}, patience "
                             f"{self.trainer.early_stopping_patience})")
        if self.optim.l2sp > 0 and not self.init_from:
            raise ValueError("optim.l2sp pulls the representation toward pre-trained weights: it needs init_from")
        return self


def load_run_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted-key ``overrides`` and validate."""
    data = apply_overrides(load_yaml(path) if path is not None else {}, overrides or {})
    return validate(RunConfig, data, source=repr(str(path)) if path else "<defaults>")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``optim.lr``) of a nested config mapping in place; returns it."""
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set '{key}': '{p}' is not a mapping")
        node[parts[-1]] = value
    return data
