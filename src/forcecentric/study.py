"""The pre-training study: does force-centric pre-training help, and which part of it?

One YAML config (``configs/study.yaml``) describes the whole experiment:

* **prepare**: held-out target molecules are split once into a training pool, validation frames
  and test frames (the same validation and test frames for every model, size and seed), and
  GFN2-xTB frames of the targets are labelled with :func:`~forcecentric.data.label.label_to_shards`
  for the ``target_in_pretraining`` setting;
* **pretrain**: one ET per (setting, objective) on the corpus (plus the target's xTB frames in the
  ``target_in_pretraining`` setting), and the denoising ablations (sigma, target scale, head);
* **finetune**: every pre-trained model and a model from scratch on each target with each
  training-set size and seed, to convergence (early stopping on the validation loss, one budget
  rule for all);
* **report**: every fine-tuned result as a row of ``study.json``, log-log learning curves, and a
  Markdown table of force MAE (N x model) per target.

Every job is an ordinary run directory under ``out/``; a job whose ``metrics.json`` exists is done,
one with only ``checkpoints/last.ckpt`` is resumed, so the study can be killed and restarted at
any point (and split across machines: pre-train on a GPU, fine-tune elsewhere).
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .config import RunConfig, _Strict, apply_overrides, load_yaml, preset_path, validate
from .data.conformation import matches
from .errors import ConfigError, DataError
from .workers import sigterm_unwinds

log = logging.getLogger("forcecentric")

SETTINGS = ("unseen", "target_in_pretraining")
OBJECTIVES = ("forces_only", "forces_zero", "forces_denoise", "full")
SCRATCH = "scratch"
# a pre-training ablation that changes the ET's size gets a from-scratch twin of the same size, named
# SCRATCH_TWIN + ablation: its ratios compare like with like
SCRATCH_TWIN = "scratch_as_"
DEFAULT_FT = "default"  # the fine-tuning settings of ``finetune.set``, without a variant
VARIANT_MODELS = "models"  # a variant's own list of models, in place of finetune.variant_models
CONTINUES = "from"  # an ablation's key: the unseen pre-training whose model it continues to train
POOLS = "pools"  # an ablation's key: targets whose training pools join its corpus (target_in_pretraining)


class DFTPoolConfig(_Strict):
    """A target's training pool made by the study: xTB-sampled frames with DFT labels, or normal-mode
    samples around the DFT minimum (``sampler: dft``), labelled with DFT."""

    n: int = Field(gt=0, description="frames drawn at random from the target's GFN2-xTB frames (sampler: dft, "
                   "normal-mode samples drawn) and labelled")
    seed: int = 0
    sampler: Literal["xtb", "dft"] = Field(
        "xtb",
        description="xtb: draw n of the study's GFN2-xTB frames; dft: re-optimize the target's GFN2-xTB minima "
        "at this DFT level and draw n normal-mode samples from the DFT Hessian, at target_xtb's normal-mode "
        "temperatures (the same sampler as the xTB normal-mode frames, around the reference's own minimum)",
    )
    select: dict[str, str] = Field(
        default_factory=dict,
        description="draw only from the xTB frames with these info values, e.g. {sampling: normal_mode}",
    )
    xtb: dict[str, Any] = Field(
        default_factory=dict,
        description="the target's own GFN2-xTB frames, sampled with target_xtb's settings changed by these "
        "(label_molecule arguments, e.g. {n_embed: 30}: more conformers tried for the minima), in place of "
        "the study's shared ones",
    )
    xc: str = "pbe"
    basis: str = "def2-svp"
    density_fit: bool = True


class TargetConfig(_Strict):
    """A held-out target molecule: where its frames come from and how they are split."""

    smiles: str | None = Field(None, description="SMILES for GFN2-xTB pre-training frames (setting b)")
    pool: list[str] = Field(default_factory=list, description="files the training frames are drawn from")
    dft_pool: DFTPoolConfig | None = Field(
        None,
        description="in place of pool: n of the study's own GFN2-xTB frames of this target's SMILES (the "
        "target_xtb frames), labelled with DFT (PySCF): the sample-with-xTB, label-a-few workflow",
    )
    heldout: list[str] = Field(
        default_factory=list,
        description="files validation and test frames are drawn from (empty: carved out of pool)",
    )
    n_val: int = Field(100, gt=0)
    n_test: int = Field(400, gt=0)
    kind: str = Field("DFT", description="level of theory, for the report")
    relabel: Literal["xtb"] | None = Field(
        None,
        description="label the split's frames anew with GFN2-xTB: the same geometries at the pre-training "
        "corpus's level of theory (a control for the level-of-theory gap)",
    )
    settings: list[Literal["unseen", "target_in_pretraining"]] = Field(
        default_factory=lambda: list(SETTINGS),
        description="pre-training settings fine-tuned on this target (target_in_pretraining needs smiles)",
    )
    select: dict[str, str] = Field(
        default_factory=dict,
        description="keep only the frames whose info key (or mol_id / source) has this value, in pool and "
        "held-out files alike, e.g. {config_type: methanol} for one molecule of a mixed file",
    )
    finetune: bool = Field(
        True, description="false: split only, a training pool for an ablation's 'pools', never fine-tuned on"
    )


class PretrainConfig(_Strict):
    preset: str = Field("demo_pretrain", description="base run config (preset name or YAML path)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides for all")
    corpus: list[str] = Field(default_factory=lambda: ["bundled:corpus"])
    objectives: dict[str, dict[str, Any]] = Field(description="objective name -> loss overrides")
    ablations: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="ablation name -> dotted overrides; 'base' names the objective whose loss weights it "
                    "starts from (default: full, or with 'from' that pre-training's) and 'from' an unseen "
                    "pre-training whose model it continues to train (its init_from; it runs once that one "
                    "has finished); 'pools' (target_in_pretraining only) lists targets whose whole training "
                    "pools, with their labels, join its corpus as source TARGET-pool (for example the DFT "
                    "pool's geometries labelled with xTB); it is not fine-tuned on those targets",
    )
    settings: dict[Literal["unseen", "target_in_pretraining"], list[str]] = Field(
        description="which objectives (and ablations) each setting pre-trains"
    )


class FinetuneConfig(_Strict):
    preset: str = "demo_finetune"
    set: dict[str, Any] = Field(default_factory=dict)
    n_train: list[int] = Field(default_factory=lambda: [50, 100, 250, 1000])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    ablation_n_train: list[int] = Field(default_factory=lambda: [50, 250])
    ablation_targets: list[str] | None = Field(None, description="targets the ablations run on (None: all)")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fine-tuning hyper-parameter variants: name -> dotted overrides (e.g. optim.lr), run "
                    "at ablation_n_train on ablation_targets for variant_models; a variant's own 'models' "
                    "list (not a config key) replaces variant_models for it, e.g. a setting that only "
                    "means something for a pre-trained model (optim.representation_lr_factor); it may "
                    "also name SETTING/NAME, a pre-training of the target_in_pretraining setting",
    )
    variant_models: list[str] = Field(
        default_factory=lambda: [SCRATCH],
        description="models fine-tuned with each variant: 'scratch' or a pre-training name (unseen setting)",
    )


class StudyConfig(_Strict):
    out: str = "runs/study"
    results: str = "benchmarks/results/study.json"
    figures: str = "docs/figures/study"
    model: dict[str, Any] = Field(default_factory=dict, description="ET hyper-parameters for every run")
    targets: dict[str, TargetConfig]
    target_xtb: dict[str, Any] = Field(
        default_factory=dict, description="label_to_shards settings for the targets' xTB frames"
    )
    pretrain: PretrainConfig
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    resolved = preset_path(str(path))
    data = apply_overrides(load_yaml(resolved), overrides or {})
    cfg = validate(StudyConfig, data, source=repr(str(resolved)))
    for setting, names in cfg.pretrain.settings.items():
        for name in names:
            if name not in cfg.pretrain.objectives and name not in cfg.pretrain.ablations:
                raise ConfigError(
                    f"pretrain.settings.{setting} names {name!r}, which is neither an objective "
                    f"{sorted(cfg.pretrain.objectives)} nor an ablation {sorted(cfg.pretrain.ablations)}"
                )
    unseen = set(cfg.pretrain.settings.get("unseen", []))
    for name, spec in cfg.pretrain.ablations.items():
        parent = spec.get(CONTINUES)
        if parent is not None and (parent == name or parent not in unseen or CONTINUES in
                                   cfg.pretrain.ablations.get(parent, {})):
            raise ConfigError(f"pretrain.ablations.{name}.{CONTINUES} is {parent!r}: it must name another "
                              f"pre-training of the unseen setting {sorted(unseen)} that does not itself "
                              f"continue one")
    for name, spec in cfg.pretrain.ablations.items():
        pools = spec.get(POOLS)
        if pools is None:
            continue
        if not isinstance(pools, list) or not pools or any(t not in cfg.targets for t in pools):
            raise ConfigError(f"pretrain.ablations.{name}.{POOLS} is {pools!r}: it must be a list of targets "
                              f"{sorted(cfg.targets)}")
        if name in unseen:
            raise ConfigError(f"pretrain.ablations.{name} has {POOLS} (targets' frames in its corpus) but is "
                              "listed in the unseen setting: list it under target_in_pretraining")
    taken = [n for n in [*cfg.pretrain.objectives, *cfg.pretrain.ablations] if n.startswith(SCRATCH)]
    if taken:
        raise ConfigError(f"pre-training names {taken} start with {SCRATCH!r}, which names the from-scratch "
                          "baselines; rename them")
    names = cfg.finetune.variant_models
    bad = [m for m in names if m != SCRATCH and m not in unseen] if isinstance(names, list) else names
    if bad:
        raise ConfigError(f"finetune.variant_models names {bad}: it must be a list of {SCRATCH!r} or "
                          f"pre-trainings of the unseen setting {sorted(unseen)}")
    pretrained = {f"{setting}/{n}" for setting, ns in cfg.pretrain.settings.items() for n in ns}
    for v, spec in cfg.finetune.variants.items():
        names = spec.get(VARIANT_MODELS, [])
        bad = [m for m in names if m != SCRATCH and m not in unseen and m not in pretrained] \
            if isinstance(names, list) else names
        if bad:
            raise ConfigError(f"finetune.variants.{v}.{VARIANT_MODELS} names {bad}: it must be a list of "
                              f"{SCRATCH!r}, pre-trainings of the unseen setting {sorted(unseen)} or "
                              f"SETTING/NAME of another setting's {sorted(pretrained - {f'unseen/{n}' for n in unseen})}")
    if DEFAULT_FT in cfg.finetune.variants:
        raise ConfigError(f"finetune.variants: {DEFAULT_FT!r} is the name of the plain fine-tuning settings; "
                          "give the variant another name")
    xtb_smiles = {smiles for _, smiles in _xtb_targets(cfg)}
    for t, tc in cfg.targets.items():
        if bool(tc.pool) == (tc.dft_pool is not None):
            raise ConfigError(f"targets.{t}: give either pool (files) or dft_pool (xTB frames labelled with DFT)")
        if tc.dft_pool is not None and (tc.smiles not in xtb_smiles or tc.heldout == []):
            raise ConfigError(f"targets.{t}.dft_pool draws from the study's GFN2-xTB frames of its smiles, and "
                              f"validates and tests on held-out files: it needs a smiles that a "
                              f"target_in_pretraining target shares ({sorted(xtb_smiles)}) and a heldout list")
        if tc.dft_pool is not None and tc.dft_pool.xtb:
            import inspect

            from .data.label import label_molecule

            known = set(inspect.signature(label_molecule).parameters) - {"name", "smiles", "dropped"}
            bad = sorted(set(tc.dft_pool.xtb) - known)
            if bad:
                raise ConfigError(f"targets.{t}.dft_pool.xtb: unknown labeller settings {bad}; known: {sorted(known)}")
        if tc.dft_pool is not None and tc.dft_pool.sampler == "dft" and tc.dft_pool.select:
            raise ConfigError(f"targets.{t}.dft_pool: select picks among the study's xTB frames; sampler: dft "
                              "draws its own samples, so it takes no select")
    if "target_in_pretraining" in cfg.pretrain.settings:
        missing = [t for t, tc in cfg.targets.items()
                   if tc.finetune and "target_in_pretraining" in tc.settings and not tc.smiles]
        if missing:
            raise ConfigError(f"the target_in_pretraining setting needs a smiles for targets {missing} "
                              "(or leave it out of their settings)")
    return cfg


def _xtb_targets(cfg: StudyConfig) -> list[tuple[str, str]]:
    """(name, SMILES) of the targets whose GFN2-xTB frames join the target_in_pretraining corpus,
    one per molecule: two targets of the same SMILES (a DFT target and its xTB-relabelled control)
    share one set of frames, named after the first."""
    if "target_in_pretraining" not in cfg.pretrain.settings:
        return []
    first: dict[str, str] = {}
    for t, tc in cfg.targets.items():
        if tc.finetune and "target_in_pretraining" in tc.settings:
            first.setdefault(tc.smiles, t)
    return [(t, smiles) for smiles, t in first.items()]


# ---------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One training run of the study."""

    kind: Literal["pretrain", "finetune"]
    run_dir: Path
    config: dict[str, Any]
    key: dict[str, Any] = field(default_factory=dict)
    needs: Path | None = None  # pre-trained model.ckpt this job starts from

    @property
    def done(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()

    @property
    def started(self) -> bool:
        return (self.run_dir / "checkpoints" / "last.ckpt").is_file()


def _preset(name: str) -> dict[str, Any]:
    return load_yaml(preset_path(name))


def _target_dir(cfg: StudyConfig, target: str) -> Path:
    return Path(cfg.out) / "targets" / target


def xtb_dir(cfg: StudyConfig) -> Path:
    return Path(cfg.out) / "targets" / "xtb"


def pool_corpus_file(cfg: StudyConfig, target: str) -> Path:
    """A target's training pool as pre-training data: its frames with source ``TARGET-pool``."""
    return _target_dir(cfg, target) / "pretrain_pool.extxyz"


def _pools_of(cfg: StudyConfig, name: str) -> list[str]:
    """The targets whose training pools join pre-training ``name``'s corpus."""
    return list(cfg.pretrain.ablations.get(name, {}).get(POOLS) or [])


def _pooled_targets(cfg: StudyConfig) -> list[str]:
    """The targets whose training pools some pre-training of the study trains on."""
    return sorted({t for names in cfg.pretrain.settings.values() for name in names for t in _pools_of(cfg, name)})


def _objective_of(cfg: StudyConfig, name: str) -> str:
    """The objective a pre-training (an objective or an ablation of one) trains with."""
    if name in cfg.pretrain.objectives:
        return name
    return cfg.pretrain.ablations[name].get("base", "full")


def pretrain_jobs(cfg: StudyConfig) -> list[Job]:
    base = _preset(cfg.pretrain.preset)
    jobs = []
    for setting, names in cfg.pretrain.settings.items():
        corpus = list(cfg.pretrain.corpus)
        if setting == "target_in_pretraining":
            # empty before `prepare`; the pretrain phase refuses to start without the frames
            corpus += [str(p) for p in sorted(xtb_dir(cfg).glob("shard-*.extxyz"))]
        for name in names:
            over = dict(cfg.pretrain.set)
            needs = None
            pools: list[str] = []
            if name in cfg.pretrain.objectives:
                over.update(cfg.pretrain.objectives[name])
            else:
                spec = dict(cfg.pretrain.ablations[name])
                continues = spec.pop(CONTINUES, None)
                pools = spec.pop(POOLS, None) or []  # the targets whose pool files join the corpus
                parent = spec.pop("base", _objective_of(cfg, continues) if continues else "full")
                over.update(cfg.pretrain.objectives[parent])
                if continues is not None:
                    needs = Path(cfg.out) / "pretrain" / "unseen" / continues / "model.ckpt"
                    over["init_from"] = str(needs)
                over.update(spec)
            run_dir = Path(cfg.out) / "pretrain" / setting / name
            data = copy.deepcopy(base)
            data["task"] = "pretrain"
            data["model"] = {**data.get("model", {}), **cfg.model}
            data["run_dir"] = str(run_dir)
            data.setdefault("data", {})["train"] = corpus + [str(pool_corpus_file(cfg, t)) for t in pools]
            apply_overrides(data, over)
            jobs.append(Job("pretrain", run_dir, data, {"setting": setting, "model": name}, needs))
    return jobs


def finetune_jobs(cfg: StudyConfig) -> list[Job]:
    """Fine-tuning jobs in priority order: the smallest N first, all its seeds, then the next N,
    so that a partial study already holds complete comparisons at the sizes that matter most."""
    base = _preset(cfg.finetune.preset)
    ft = cfg.finetune
    ablations = set(cfg.pretrain.ablations)
    jobs = []
    model_over = {name: {k: v for k, v in spec.items() if k.startswith("model.")}
                  for name, spec in cfg.pretrain.ablations.items()}
    models: list[tuple[str, str | None]] = [(SCRATCH, None)]
    for setting, names in cfg.pretrain.settings.items():
        models += [(name, setting) for name in names]
    # a size-changing ablation's scratch twin: fine-tuned from random weights at the ablation's ET size
    twins = {SCRATCH_TWIN + name: name for name in cfg.pretrain.settings.get("unseen", []) if model_over.get(name)}
    models += [(twin, None) for twin in twins]
    sizes = sorted(set(ft.n_train) | set(ft.ablation_n_train))
    pools = {target: pool_size(cfg, target) for target in cfg.targets}
    for n in sizes:
        for seed in ft.seeds:
            for target, tc in cfg.targets.items():
                tdir = _target_dir(cfg, target)
                if n > pools[target] or not tc.finetune:
                    continue
                in_ablation = n in ft.ablation_n_train and (
                    ft.ablation_targets is None or target in ft.ablation_targets)
                for (name, setting), variant in [(m, DEFAULT_FT) for m in models] + [
                        (m, v) for v in ft.variants for m in models if _gets_variant(m, twins, ft.variants[v], ft)]:
                    if setting is not None and (setting not in tc.settings or target in _pools_of(cfg, name)):
                        continue  # not this target's setting, or its own pool was pre-trained on
                    if name in ablations or name in twins or variant != DEFAULT_FT:
                        if not in_ablation:
                            continue
                    elif n not in ft.n_train:
                        continue
                    label = f"{setting}/{name}" if setting else name
                    leaf = f"n{n}_seed{seed}" + ("" if variant == DEFAULT_FT else f"_{variant}")
                    run_dir = Path(cfg.out) / "finetune" / target / label / leaf
                    data = copy.deepcopy(base)
                    data["task"] = "finetune"
                    data["seed"] = seed
                    data["model"] = {**data.get("model", {}), **cfg.model}
                    data["run_dir"] = str(run_dir)
                    data.setdefault("data", {}).update(
                        train=[str(tdir / "pool.extxyz")], val=[str(tdir / "val.extxyz")],
                        test=[str(tdir / "test.extxyz")], n_train=n,
                    )
                    apply_overrides(data, dict(ft.set))
                    apply_overrides(data, dict(model_over.get(twins.get(name, name), {})))  # e.g. a larger ET
                    apply_overrides(data, {k: v for k, v in ft.variants.get(variant, {}).items()
                                           if k != VARIANT_MODELS})
                    needs = None
                    if setting is not None:
                        needs = Path(cfg.out) / "pretrain" / setting / name / "model.ckpt"
                        data["init_from"] = str(needs)
                    key = {"molecule": target, "setting": setting or "none", "model": name,
                           "n_train": n, "seed": seed, "finetune": variant}
                    jobs.append(Job("finetune", run_dir, data, key, needs))
    return jobs


def _gets_variant(model: tuple[str, str | None], twins: dict[str, str], variant: dict[str, Any],
                  ft: FinetuneConfig) -> bool:
    """Whether a fine-tuning variant runs for ``model`` (name, pre-training setting): its own
    ``models`` list, or ``variant_models``, names it (plain names: scratch and the unseen setting;
    SETTING/NAME: a pre-training of another setting; a scratch twin goes with its ablation)."""
    name, setting = model
    names = variant.get(VARIANT_MODELS, ft.variant_models)
    if setting in (None, "unseen"):
        return twins.get(name, name) in names
    return f"{setting}/{name}" in names


def pool_size(cfg: StudyConfig, target: str) -> float:
    """Frames a target's training pool holds (infinite before ``prepare`` has split it)."""
    split = _target_dir(cfg, target) / "split.json"
    return json.loads(split.read_text())["pool"] if split.is_file() else float("inf")


# ------------------------------------------------------------------------------ prepare
def _write_frames(path: Path, records) -> None:
    from .data.label import write_extxyz

    write_extxyz(path, [r.to_atoms() for r in records])


def prepare(cfg: StudyConfig, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Split each target into pool / val / test files and label the targets' xTB frames."""
    from .data import read_all
    from .train.datamodule import resolve_path

    report: dict[str, Any] = {}
    # first the targets' xTB frames: a dft_pool target's training frames are drawn from them
    molecules = _xtb_targets(cfg)
    if molecules:
        from .data.label import label_to_shards

        settings = dict(cfg.target_xtb)
        report["xtb"] = label_to_shards(molecules, xtb_dir(cfg), molecules_per_shard=1,
                                        n_workers=workers, progress=progress, **settings)
        n = sum(len(read_all(p)) for p in sorted(xtb_dir(cfg).glob("shard-*.extxyz")))
        report["xtb"]["n_frames"] = n
    for target, tc in cfg.targets.items():
        tdir = _target_dir(cfg, target)
        files = {k: tdir / f"{k}.extxyz" for k in ("pool", "val", "test")}
        if all(p.is_file() for p in files.values()):
            report[target] = json.loads((tdir / "split.json").read_text())
            continue
        pool_files = tc.pool
        if tc.dft_pool is not None:
            pool_files = [str(_dft_pool(cfg, target, tc, progress))]
        pool = [r for spec in pool_files for r in read_all(resolve_path(spec)) if matches(r, tc.select)]
        if not pool:
            raise DataError(f"target {target!r}: no frame of its pool matches select {tc.select}", file=str(pool_files))
        if tc.heldout:
            held = [r for spec in tc.heldout for r in read_all(resolve_path(spec)) if matches(r, tc.select)]
        else:
            held, pool = _carve(pool, tc.n_val + tc.n_test, seed=12345)
        if len(held) < tc.n_val + tc.n_test:
            raise DataError(
                f"target {target!r}: {len(held)} held-out frames, fewer than n_val + n_test = "
                f"{tc.n_val + tc.n_test}", file=str(tc.heldout or tc.pool)
            )
        perm = np.random.default_rng(12345).permutation(len(held))
        val = [held[i] for i in perm[: tc.n_val]]
        test = [held[i] for i in perm[tc.n_val : tc.n_val + tc.n_test]]
        if tc.relabel == "xtb":
            # after the split, which depends on frame counts only: the same frames as the unrelabelled
            # target's, and no labels computed for held-out frames that are never used
            from .data.label import relabel_xtb

            pool = relabel_xtb(pool, file=f"{target} pool from {tc.pool}")
            val, test = (relabel_xtb(part, file=f"{target} {name} frames from {tc.heldout or tc.pool}")
                         for name, part in (("validation", val), ("test", test)))
        tdir.mkdir(parents=True, exist_ok=True)
        _write_frames(files["val"], val)
        _write_frames(files["test"], test)
        _write_frames(files["pool"], pool)
        info = {"pool": len(pool), "val": len(val), "test": len(test),
                "pool_files": pool_files, "heldout_files": tc.heldout or tc.pool, "kind": tc.kind,
                "relabel": tc.relabel, "dft_pool": tc.dft_pool.model_dump() if tc.dft_pool else None}
        (tdir / "split.json").write_text(json.dumps(info, indent=2))
        report[target] = info
    for target in _pooled_targets(cfg):
        path = pool_corpus_file(cfg, target)
        if not path.is_file():
            records = read_all(_target_dir(cfg, target) / "pool.extxyz")
            for r in records:
                r.source = f"{target}-pool"
            _write_frames(path, records)
        report.setdefault("pools", {})[target] = str(path)
    return report


def _dft_pool(cfg: StudyConfig, target: str, tc: TargetConfig, progress: bool) -> Path:
    """A dft_pool target's training frames: ``n`` of its SMILES's xTB frames with DFT labels
    (``forcecentric relabel``; resumable, and made once)."""
    from .data.dft import DFTSettings
    from .data.relabel import relabel_file

    path = _target_dir(cfg, target) / "relabelled_pool.extxyz"
    if not path.is_file():
        spec = tc.dft_pool
        dft = DFTSettings(xc=spec.xc, basis=spec.basis, density_fit=spec.density_fit)
        shards = sorted(xtb_dir(cfg).glob("shard-*.extxyz"))
        if spec.xtb:
            from .data.label import label_to_shards

            own = _target_dir(cfg, target) / "xtb"
            name = next(n for n, smiles in _xtb_targets(cfg) if smiles == tc.smiles)  # the shared frames' seeds
            label_to_shards([(name, tc.smiles)], own, molecules_per_shard=1, n_workers=1, progress=progress,
                            **{**cfg.target_xtb, **spec.xtb})
            shards = sorted(own.glob("shard-*.extxyz"))
        n, select = spec.n, {**spec.select, "smiles": tc.smiles}
        if spec.sampler == "dft":  # every sample (n were drawn; the outlier filter may have dropped some)
            shards, n, select = [_dft_normal_mode_frames(cfg, target, tc, dft, shards)], None, {}
        relabel_file(shards, path, "dft", n=n, seed=spec.seed, select=select, dft=dft, progress=progress)
    return path


def _dft_normal_mode_frames(cfg: StudyConfig, target: str, tc: TargetConfig, dft, shards: list[Path]) -> Path:
    """``sampler: dft``: normal-mode samples around the target's minima (in ``shards``, its GFN2-xTB
    frames) re-optimized at DFT level.

    Each of the target's GFN2-xTB minima is optimized again with ``dft`` and its Hessian computed at
    that level (6N DFT gradients); ``n`` samples are then drawn from those modes at target_xtb's
    normal-mode temperatures, split over minima and temperatures as the labeller splits them. The
    samples carry cheap GFN2-xTB labels here (for the labeller's outlier filter); :func:`_dft_pool`
    relabels them with DFT, resumably. Minima and modes are kept in ``dft_sampler/``, so a killed run
    does not redo them."""
    from .data import read_all
    from .data.label import (_split, filter_frames, normal_modes, optimize_minimum, sample_normal_modes,
                             write_extxyz)

    spec = tc.dft_pool
    tdir = _target_dir(cfg, target)
    work = tdir / "dft_sampler"
    work.mkdir(parents=True, exist_ok=True)
    out = work / "samples_xtb_labels.extxyz"
    if out.is_file():
        return out
    minima = [r.to_atoms() for p in shards for r in read_all(p)
              if matches(r, {"smiles": tc.smiles, "sampling": "minimum"})]
    if not minima:
        raise DataError(f"target {target!r}: the study's GFN2-xTB frames hold no minimum of {tc.smiles}",
                        file=str(xtb_dir(cfg)))
    settings = dict(cfg.target_xtb)
    temperatures = [float(t) for t in settings.get("normal_mode_temperatures", (300.0, 500.0))]
    from ase.io import read

    modes = []
    for k, m in enumerate(minima):
        m_path, modes_path = work / f"minimum-{k}.extxyz", work / f"modes-{k}.npz"
        if not m_path.is_file():
            log.info("%s: optimizing GFN2-xTB minimum %d with %s", target, k, dft.level_of_theory)
            t0 = time.time()
            write_extxyz(m_path, [optimize_minimum(m, dft=dft, source=f"{target}-dft-sampler")])
            log.info("%s: minimum %d optimized in %.0f s", target, k, time.time() - t0)
        minimum = read(m_path)
        if not modes_path.is_file():
            log.info("%s: %s Hessian of minimum %d (%d gradients)", target, dft.level_of_theory, k, 6 * len(minimum))
            t0 = time.time()
            vecs, mu, eig = normal_modes(minimum, dft=dft)
            log.info("%s: Hessian %d done in %.0f s", target, k, time.time() - t0)
            tmp = modes_path.with_suffix(".tmp.npz")
            np.savez(tmp, modes=vecs, reduced_masses=mu, eigenvalues=eig)
            tmp.replace(modes_path)
        with np.load(modes_path) as f:
            modes.append((minimum, (f["modes"], f["reduced_masses"], f["eigenvalues"])))
    seeds = np.random.SeedSequence([spec.seed, zlib.crc32(target.encode())]).spawn(len(temperatures) * len(modes))
    counts = _split(spec.n, len(temperatures) * len(modes), 0)
    frames = []
    for i, (T, (minimum, m)) in enumerate((T, mm) for T in temperatures for mm in modes):
        n = counts[i]
        samples = sample_normal_modes(minimum, n, temperature=T, seed=seeds[i], modes=m,
                                      min_wavenumber=float(settings.get("min_wavenumber", 100.0)),
                                      source=f"{target}-dft-sampler")
        frames += filter_frames(samples, max_force=float(settings.get("max_force", 10.0)))[0]
    write_extxyz(out, frames)
    return out


def _carve(records: list, n: int, seed: int) -> tuple[list, list]:
    perm = np.random.default_rng(seed).permutation(len(records))
    take = set(perm[:n].tolist())
    return [records[i] for i in perm[:n]], [r for i, r in enumerate(records) if i not in take]


# -------------------------------------------------------------------------------- running
def _run_job(args: tuple[dict[str, Any], str, int, bool]) -> dict[str, Any]:
    """Worker body: one training run in a fresh process (own threads, own device)."""
    data, accelerator, threads, progress = args
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from .train.run import run

    data = copy.deepcopy(data)
    data.setdefault("trainer", {})["accelerator"] = accelerator
    data["trainer"]["progress_bar"] = progress
    run_dir = Path(data["run_dir"])
    t0 = time.time()
    try:
        cfg = validate(RunConfig, data, source=str(run_dir))
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        if not resume and run_dir.is_dir():
            # a run killed before its first checkpoint (or copied without checkpoints): start
            # clean, so its metrics.csv does not mix two runs
            shutil.rmtree(run_dir)
        (run_dir / "error.txt").unlink(missing_ok=True)
        metrics = run(cfg, resume=resume)
        return {"run_dir": str(run_dir), "ok": True, "wall_s": round(time.time() - t0, 1),
                "force_mae": metrics.get("test", metrics["val"])["force_mae"]}
    except Exception as exc:  # reported, the study goes on with the other jobs
        (run_dir).mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        return {"run_dir": str(run_dir), "ok": False, "error": f"{type(exc).__name__}: {exc}"}


def run_jobs(jobs: list[Job], workers: int = 1, accelerator: str = "cpu", threads: int = 1,
             stop_after_minutes: float | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run the jobs that are not done (in order, ``workers`` at a time, one fresh process per
    job). A job whose starting model is missing is skipped with a message, unless another of
    ``jobs`` makes it: then it waits for that one. So is a job whose training data is missing (a
    corpus an ablation names that has not been built here). After ``stop_after_minutes`` no new
    job starts; running ones finish."""
    from .train.datamodule import BUNDLED_PREFIX

    made = {j.run_dir / "model.ckpt" for j in jobs if not j.done}
    ready = []
    for j in jobs:
        if j.done:
            continue
        absent = [str(f) for f in j.config.get("data", {}).get("train") or []
                  if not str(f).startswith(BUNDLED_PREFIX) and not Path(f).exists()]
        if absent:
            log.warning("skipping %s: its training data %s does not exist (the study config says how to "
                        "build it)", j.run_dir, absent)
        elif j.needs is None or j.needs.is_file() or j.needs in made:
            ready.append(j)
        else:
            log.warning("skipping %s: pre-trained model %s does not exist yet", j.run_dir, j.needs)
    if not ready:
        return []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ready), desc="study jobs", unit="run", disable=not progress)
    # a SIGTERM (kill, timeout, a batch system) unwinds through the pool's context manager,
    # which terminates the workers instead of leaving them to run on without a parent
    try:
        with sigterm_unwinds():
            results = _drive_pool(ready, workers, accelerator, threads, stop_after_minutes, bar)
    finally:
        bar.close()
    return results


def _drive_pool(ready, workers, accelerator, threads, stop_after_minutes, bar) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=max(1, workers), maxtasksperchild=1) as pool:
        waiting = list(ready)
        running: list = []
        while waiting or running:
            late = stop_after_minutes is not None and time.time() - t0 > 60 * stop_after_minutes
            while waiting and len(running) < workers and not late:
                job = next((j for j in waiting if j.needs is None or j.needs.is_file()), None)
                if job is None:  # the rest wait for a running job's model
                    break
                waiting.remove(job)
                running.append(pool.apply_async(_run_job, ((job.config, accelerator, threads, False),)))
            if waiting and not running and not late:
                for j in waiting:
                    log.warning("skipping %s: pre-trained model %s was not made", j.run_dir, j.needs)
                waiting = []
            if late and waiting:
                log.warning("time budget reached: %d jobs not started (run again to continue)", len(waiting))
                waiting = []
            still = []
            for r in running:
                if r.ready():
                    res = r.get()
                    results.append(res)
                    bar.update(1)
                    if not res["ok"]:
                        log.warning("job %s failed: %s", res["run_dir"], res["error"])
                else:
                    still.append(r)
            running = still
            time.sleep(0.5)
    return results


# ------------------------------------------------------------------------------- report
def _recorded_entry(job: Job, recorded: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The last entry of ``recorded`` (an earlier report's rows) with ``job``'s key, or None."""
    found = [r for r in recorded or [] if all(str(r.get(k)) == str(v) for k, v in job.key.items())]
    return found[-1] if found else None


def _recorded(path: Path, what: str) -> list[dict[str, Any]]:
    """The rows an earlier report wrote to ``path`` (none if it does not exist)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data if what == "rows" else data.get(what, [])


def collect(cfg: StudyConfig, recorded: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per finished fine-tuning run (test-set errors in meV/A and meV).

    A planned run whose folder is not here (a new checkout, another machine) keeps its row from
    ``recorded``, the rows of an earlier report, so that a report never drops measured results;
    a run folder that is here replaces its recorded row.
    """
    rows = []
    kept = 0
    for job in finetune_jobs(cfg):
        if not job.done:
            old = _recorded_entry(job, recorded)
            if old is not None:
                rows.append(old)
                kept += 1
            continue
        m = json.loads((job.run_dir / "metrics.json").read_text())
        test = m["test"]
        row = dict(job.key)
        row.update(
            force_mae=1000.0 * test["force_mae"],
            energy_mae=1000.0 * test["energy_mae"] if test.get("energy_mae") is not None else None,
            force_rmse=1000.0 * test["force_rmse"],
            val_force_mae=1000.0 * m["val"]["force_mae"],
            epochs=m["epochs"], steps=m["global_steps"], wall_s=m["wall_time_s"],
            n_test=test["n_conformations"],
        )
        # the hardware of the run's last start (a study may be split across machines)
        run_cfg = job.run_dir / "config.yaml"
        row["accelerator"] = (load_yaml(run_cfg).get("trainer") or {}).get("accelerator") if run_cfg.is_file() else None
        rows.append(row)
    if kept:
        log.info("%d of %d rows come from the earlier report (their run folders are not here)", kept, len(rows))
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (molecule, setting, model, N), plus scratch / model ratios."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        ft = r.get("finetune", DEFAULT_FT)
        groups.setdefault((r["molecule"], r["setting"], r["model"], r["n_train"], ft), []).append(r)
    scratch = {(k[0], k[2], k[3], k[4]): np.mean([r["force_mae"] for r in v])
               for k, v in groups.items() if is_scratch(k[2])}
    scratch_runs = {k[:3] for k in scratch}
    out = []
    for (mol, setting, model, n, ft), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][4] != DEFAULT_FT, kv[0][4], kv[0][1], kv[0][2])):
        f = np.array([r["force_mae"] for r in rs])
        e = np.array([r["energy_mae"] for r in rs if r["energy_mae"] is not None])
        base = None if is_scratch(model) else baseline(model, scratch_runs, mol, n)
        # a variant is compared with scratch fine-tuned the same way when that exists
        s = scratch.get((mol, base, n, ft), scratch.get((mol, base, n, DEFAULT_FT)))
        out.append({
            "molecule": mol, "setting": setting, "model": model, "n_train": n, "finetune": ft, "n_seeds": len(rs),
            "force_mae_mean": float(f.mean()), "force_mae_std": float(f.std(ddof=1)) if len(f) > 1 else 0.0,
            "energy_mae_mean": float(e.mean()) if len(e) else None,
            "baseline": base if s is not None else None,
            "ratio_scratch_over_model": float(s / f.mean()) if s is not None else None,
        })
    return out


def is_scratch(model: str) -> bool:
    """Whether a study model starts from random weights: ``scratch`` or a size-matched twin."""
    return model == SCRATCH or model.startswith(SCRATCH_TWIN)


def baseline(model: str, scratch_runs: set[tuple[str, str, int]], molecule: str, n: int) -> str:
    """The from-scratch model a pre-trained one is compared with: its size-matched twin where that
    was fine-tuned on this molecule at this N, else ``scratch``. ``scratch_runs`` holds
    (molecule, scratch model, N) of the finished scratch cells."""
    twin = SCRATCH_TWIN + model
    return twin if (molecule, twin, n) in scratch_runs else SCRATCH


def tuned_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model at its own fine-tuning settings: per (molecule, setting, model, N), the variant
    (e.g. learning rate) with the lowest mean *validation* force MAE, among those with the most
    seeds; its test errors, and the ratio to scratch chosen the same way. The test frames never
    take part in the choice. Only (molecule, N) cells where some model ran under more than one
    variant are listed; there a model run under one variant only appears with that one, so its
    ratio to a tuned scratch is the conservative one."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        key = (r["molecule"], r["setting"], r["model"], r["n_train"])
        groups.setdefault(key, {}).setdefault(r.get("finetune", DEFAULT_FT), []).append(r)
    swept = {(k[0], k[3]) for k, variants in groups.items() if len(variants) > 1}
    chosen = {}
    for key, variants in groups.items():
        if (key[0], key[3]) not in swept:
            continue
        most = max(len(rs) for rs in variants.values())
        candidates = {ft: rs for ft, rs in variants.items() if len(rs) == most}
        best = min(candidates, key=lambda ft: np.mean([r["val_force_mae"] for r in candidates[ft]]))
        f = np.array([r["force_mae"] for r in candidates[best]])
        chosen[key] = {
            "molecule": key[0], "setting": key[1], "model": key[2], "n_train": key[3], "finetune": best,
            "n_seeds": most, "candidates": sorted(candidates),
            "val_force_mae_mean": float(np.mean([r["val_force_mae"] for r in candidates[best]])),
            "force_mae_mean": float(f.mean()), "force_mae_std": float(f.std(ddof=1)) if len(f) > 1 else 0.0,
        }
    scratch_runs = {(k[0], k[2], k[3]) for k in chosen if is_scratch(k[2])}
    for (mol, _, model, n), c in chosen.items():
        base = None if is_scratch(model) else baseline(model, scratch_runs, mol, n)
        s = chosen.get((mol, "none", base, n))
        c["baseline"] = base if s else None
        c["ratio_scratch_over_model"] = float(s["force_mae_mean"] / c["force_mae_mean"]) if s else None
    return sorted(chosen.values(), key=lambda c: (c["molecule"], c["n_train"], not is_scratch(c["model"]),
                                                  c["setting"], c["model"]))


def tuned_table(tuned: list[dict[str, Any]]) -> str:
    if not tuned:
        return ""
    lines = ["\n**Each model at its own fine-tuning settings** (of the variants run for it, the one with the "
             "lowest mean validation force MAE; test force MAE in meV/Å, × = scratch / model, both chosen "
             "this way)\n",
             "| molecule | N | model | chosen | of | val force MAE | test force MAE |", "|---|---:|---|---|---|---:|---:|"]
    for c in tuned:
        label = c["model"] if c["setting"] == "none" else f"{c['model']} ({c['setting']})"
        cell = f"{c['force_mae_mean']:.1f} ± {c['force_mae_std']:.1f}"
        if c["ratio_scratch_over_model"]:
            cell += _ratio(c)
        lines.append(f"| {c['molecule']} | {c['n_train']} | {label} | {c['finetune']} | {', '.join(c['candidates'])} "
                     f"({c['n_seeds']} seed{'s' if c['n_seeds'] > 1 else ''}) | {c['val_force_mae_mean']:.1f} | {cell} |")
    return "\n".join(lines) + "\n"


def _ratio(s: dict[str, Any]) -> str:
    """The ratio cell: scratch / model, naming the baseline when it is a size-matched twin."""
    base = s.get("baseline") or SCRATCH
    return f" ({s['ratio_scratch_over_model']:.2f}×{'' if base == SCRATCH else ' vs ' + base})"


def _label(s: dict[str, Any], short: bool = False) -> str:
    """Row label of a summary entry: model, its pre-training setting, the fine-tuning variant."""
    setting = s["setting"][:6] if short else s["setting"]
    label = s["model"] if s["setting"] == "none" else f"{s['model']} ({setting})"
    return label if s.get("finetune", DEFAULT_FT) == DEFAULT_FT else f"{label} [{s['finetune']}]"


def markdown_tables(summary: list[dict[str, Any]]) -> str:
    lines = []
    for mol in sorted({s["molecule"] for s in summary}):
        rows = [s for s in summary if s["molecule"] == mol]
        sizes = sorted({s["n_train"] for s in rows})
        models = []
        for s in rows:
            if (_label(s), s["setting"], s["model"], s["finetune"]) not in models:
                models.append((_label(s), s["setting"], s["model"], s["finetune"]))
        order = {name: i for i, name in enumerate((SCRATCH,) + OBJECTIVES)}
        models.sort(key=lambda m: (m[3] != DEFAULT_FT, m[3], SETTINGS.index(m[1]) + 1 if m[1] in SETTINGS else 0,
                                   order.get(m[2], len(order)), m[2]))
        lines.append(f"\n**{mol}**: test force MAE in meV/Å, mean ± std over seeds "
                     "(× = scratch / model)\n")
        lines.append("| model | " + " | ".join(f"N={n}" for n in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        for label, setting, model, ft in models:
            cells = []
            for n in sizes:
                hit = [s for s in rows if s["setting"] == setting and s["model"] == model and s["n_train"] == n
                       and s["finetune"] == ft]
                if not hit:
                    cells.append("")
                    continue
                s = hit[0]
                cell = f"{s['force_mae_mean']:.1f} ± {s['force_mae_std']:.1f}"
                if s["ratio_scratch_over_model"]:
                    cell += _ratio(s)
                if s["n_seeds"] < 3:
                    cell += f" [{s['n_seeds']} seed{'s' if s['n_seeds'] > 1 else ''}]"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(cfg: StudyConfig, wall: dict[str, float] | None = None) -> dict[str, Any]:
    """Write ``study.json`` (rows), ``study_summary.json``, the tables and the plots."""
    from .evaluation import write_json
    from .plots import study_bars, study_learning_curves
    from .provenance import machine_info, versions

    results = Path(cfg.results)
    summary_file = results.with_name(results.stem + "_summary.json")
    rows = collect(cfg, _recorded(results, "rows"))
    if not rows:
        raise ConfigError(f"no finished fine-tuning runs under {cfg.out!r}: run the study first")
    summary = summarize(rows)
    write_json(rows, cfg.results)
    tuned = tuned_summary(rows)
    meta = {"machine": machine_info("cpu"), "versions": versions(), "config": cfg.model_dump(mode="json"),
            "pretrain": _pretrain_summary(cfg, _recorded(summary_file, "pretrain")), "wall_time_s": wall or {},
            "summary": summary, "tuned": tuned}
    write_json(meta, summary_file)
    figs = Path(cfg.figures)
    figs.mkdir(parents=True, exist_ok=True)
    plots = []
    for mol in sorted({r["molecule"] for r in summary}):
        for setting in ("unseen", "target_in_pretraining"):
            sel = [s for s in summary if s["molecule"] == mol and s["setting"] in ("none", setting)
                   and s["model"] in (SCRATCH,) + OBJECTIVES and s["finetune"] == DEFAULT_FT]
            if any(s["setting"] == setting for s in sel):
                plots.append(str(study_learning_curves(sel, f"{mol}, {setting}", figs / f"{mol}_{setting}.png")))
    for mol in sorted({r["molecule"] for r in summary}):
        for n in cfg.finetune.ablation_n_train:
            sel = [dict(s, label=_label(s, short=True))
                   for s in summary if s["molecule"] == mol and s["n_train"] == n]
            if any(s["model"] in cfg.pretrain.ablations or s["finetune"] != DEFAULT_FT for s in sel):
                plots.append(str(study_bars(sel, f"{mol}, N = {n}: every variant",
                                            figs / f"{mol}_n{n}_variants.png")))
    md = markdown_tables(summary) + tuned_table(tuned) + pretrain_table(meta["pretrain"])
    (figs / "tables.md").write_text(md)
    return {"rows": len(rows), "plots": plots, "tables": md}


def pretrain_table(pretrain: list[dict[str, Any]]) -> str:
    """Markdown table of the pre-training runs: validation force MAE on held-out corpus frames."""
    lines = ["\n**pre-training**: force MAE on 500 held-out corpus conformations (meV/Å)\n",
             "The two settings draw their validation conformations from different pools: "
             "`target_in_pretraining` includes the targets' xTB frames.\n",
             "| setting | variant | val force MAE | epochs | steps | wall (s) |", "|---|---|---:|---:|---:|---:|"]
    for p in sorted(pretrain, key=lambda p: (p["setting"], p["val_force_mae"])):
        lines.append(f"| {p['setting']} | {p['model']} | {p['val_force_mae']:.1f} | {p['epochs']} | "
                     f"{p['steps']} | {p['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _pretrain_summary(cfg: StudyConfig, recorded: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The finished pre-trainings' metrics; one whose folder is not here keeps its ``recorded`` entry."""
    out = []
    for job in pretrain_jobs(cfg):
        if not job.done:
            old = _recorded_entry(job, recorded)
            if old is not None:
                out.append(old)
        else:
            m = json.loads((job.run_dir / "metrics.json").read_text())
            out.append({**job.key, "val_force_mae": 1000.0 * m["val"]["force_mae"], "epochs": m["epochs"],
                        "steps": m["global_steps"], "wall_s": m["wall_time_s"], "train_size": m["train_size"]})
    return out


def status(cfg: StudyConfig) -> dict[str, Any]:
    out = {}
    for kind, jobs in (("pretrain", pretrain_jobs(cfg)), ("finetune", finetune_jobs(cfg))):
        out[kind] = {"total": len(jobs), "done": sum(j.done for j in jobs),
                     "started": sum(j.started and not j.done for j in jobs),
                     "failed": sum((j.run_dir / "error.txt").is_file() and not j.done for j in jobs)}
    return out


def run_study(cfg: StudyConfig, phase: str = "all", workers: int = 2, accelerator: str = "cpu",
              threads: int = 1, stop_after_minutes: float | None = None, progress: bool = True,
              filters: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run one phase (``prepare``, ``pretrain``, ``finetune``, ``report``) or ``all`` of them."""
    wall: dict[str, float] = {}
    out: dict[str, Any] = {}
    phases = ("prepare", "pretrain", "finetune", "report") if phase == "all" else (phase,)
    for ph in phases:
        t0 = time.time()
        if ph == "prepare":
            out["prepare"] = prepare(cfg, workers=workers, progress=progress)
        elif ph in ("pretrain", "finetune"):
            if ph == "finetune":
                wanted = (filters or {}).get("molecule") or list(cfg.targets)  # only the targets it will run
                unprepared = [t for t in cfg.targets
                              if t in wanted and not (_target_dir(cfg, t) / "split.json").is_file()]
                if unprepared:
                    raise ConfigError(f"targets {unprepared} are not split yet: run --phase prepare first")
            elif "target_in_pretraining" in cfg.pretrain.settings and not list(xtb_dir(cfg).glob("shard-*.extxyz")):
                raise ConfigError(f"no GFN2-xTB target frames in {str(xtb_dir(cfg))!r}: run --phase prepare first")
            else:
                missing = [str(pool_corpus_file(cfg, t)) for t in _pooled_targets(cfg)
                           if not pool_corpus_file(cfg, t).is_file()]
                if missing:
                    raise ConfigError(f"no pre-training pool files {missing}: run --phase prepare first")
            jobs = pretrain_jobs(cfg) if ph == "pretrain" else finetune_jobs(cfg)
            for k, allowed in (filters or {}).items():
                jobs = [j for j in jobs if str(j.key.get(k)) in allowed]
            out[ph] = run_jobs(jobs, workers, accelerator, threads, stop_after_minutes, progress)
        elif ph == "report":
            out["report"] = report(cfg)
        wall[ph] = round(time.time() - t0, 1)
    out["wall_time_s"] = wall
    return out
