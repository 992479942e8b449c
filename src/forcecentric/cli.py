"""Command line: ``forcecentric <command>``; ``forcecentric <command> --help`` for each."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import __version__
from .config import PRESETS_DIR, preset_path
from .errors import ConfigError, ForceCentricError

def _key_values(items: list[str] | None, option: str, form: str, *, keys: tuple[str, ...] | None = None,
                need_value: bool = False) -> dict[str, str]:
    """The KEY=VALUE items of a repeatable option, as raw strings (a later KEY wins); ``form`` is
    what the error shows, e.g. "KEY=VALUE, e.g. temperature_K=500.0"."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or (need_value and not value) or (keys is not None and key not in keys):
            allowed = f" with KEY one of {', '.join(keys)}" if keys is not None else ""
            raise ConfigError(f"{option} expects {form}{allowed}; got {item!r}")
        out[key] = value
    return out


def _overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items: dotted keys, values parsed as YAML."""
    return {k: yaml.safe_load(v) for k, v in _key_values(items, "--set", "KEY=VALUE (dotted keys)").items()}


def _load_cfg(args, task: str, extra: dict[str, Any] | None = None):
    from .config import load_run_config

    over = {"task": task}
    over.update(extra or {})
    if getattr(args, "run_dir", None):
        over["run_dir"] = args.run_dir
    over.update(_overrides(args.set))
    return load_run_config(preset_path(args.config), over)


def cmd_pretrain(args) -> int:
    from .train.run import run

    cfg = _load_cfg(args, "pretrain")
    metrics = run(cfg, resume=args.resume)
    _print_summary(metrics)
    return 0


def cmd_finetune(args) -> int:
    from .train.run import run

    # --from overrides the config's init_from; without it a config's own init_from stands
    extra: dict[str, Any] = {} if args.init_from is None else {"init_from": args.init_from}
    if args.data:
        extra["data.train"] = list(args.data)
    if args.task == "property":  # targets are checked by run(), before it writes anything
        if args.target:
            extra["property.targets"] = list(args.target)
        if args.config is None:
            args.config = "property"
        cfg = _load_cfg(args, "property", extra)
    else:
        if args.target:
            raise ForceCentricError("--target is for --task property (molecular properties)")
        if args.config is None:
            args.config = "finetune"
        cfg = _load_cfg(args, "finetune", extra)
    metrics = run(cfg, resume=args.resume)
    _print_summary(metrics)
    return 0


def cmd_predict(args) -> int:
    from .checkpoint import load
    from .data.dataset import property_values
    from .errors import DataError
    from .evaluation import check_elements, error_metrics, predict
    from .nn.properties import TARGETS, PropertyModel
    from .properties import predict_properties, property_metrics, write_predictions_csv
    from .train.datamodule import open_source, resolve_path

    model = load(args.model, device=args.device, dtype=args.dtype)
    path = resolve_path(args.data)
    ds = open_source(args.data, args.format)
    records = [ds[i] for i in range(len(ds))]
    check_elements(model, records, str(path))
    out = Path(args.out) if args.out else Path(path.stem + "_predictions.csv")
    summary: dict[str, Any] = {"model": str(args.model), "data": str(path), "n_molecules": len(records),
                               "predictions": str(out)}
    if isinstance(model, PropertyModel):
        names = model.targets
        pred = predict_properties(model, records, args.batch_size)
        columns = {n: pred[n] for n in names}
        units = {n: TARGETS[n].unit for n in names}
        reference = {}
        for n in names:  # references where every record has the property
            try:
                reference[n] = property_values(records, [n], file=str(path))[:, 0]
            except DataError:
                pass
        if reference:
            ref = np.stack([reference.get(n, np.full(len(records), np.nan)) for n in names], axis=1)
            metrics = property_metrics(ref, pred, names)
            summary["metrics"] = {n: metrics[n] for n in reference}
    else:
        energies, forces = predict(model, records, args.batch_size)
        columns = {"energy": energies, "max_force": np.array([np.abs(f).max() for f in forces])}
        units = {"energy": "eV", "max_force": "eV/A"}
        reference = None
        if all(r.energy is not None for r in records):
            reference = {"energy": np.array([r.energy for r in records])}
            summary["metrics"] = {"energy": {"mae": error_metrics(records, energies, forces)["energy_mae"],
                                             "unit": "eV"}}
    write_predictions_csv(out, records, columns, units, reference)
    print(json.dumps(summary, indent=2, default=float))
    return 0


def cmd_evaluate(args) -> int:
    from .checkpoint import load
    from .evaluation import evaluate
    from .train.datamodule import open_source, resolve_path

    from .nn.properties import PropertyModel
    from .properties import evaluate_properties

    model = load(args.model, device=args.device, dtype=args.dtype)
    score = evaluate_properties if isinstance(model, PropertyModel) else evaluate
    results = {}
    for spec in args.data:
        path = resolve_path(spec)
        ds = open_source(spec, args.format)
        records = [ds[i] for i in range(len(ds))]
        name = path.stem or path.name
        results[str(path)] = score(model, records, args.out, name=name, file=str(path),
                                   batch_size=args.batch_size)
    print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2, default=float))
    return 0


def cmd_label_properties(args) -> int:
    from .data.label import label_properties, write_extxyz
    from .train.datamodule import open_source

    records = []
    for spec in args.data:
        ds = open_source(spec, args.format)
        records.extend(ds[i] for i in range(len(ds)))
    if not records:
        raise ForceCentricError(f"no structures in {args.data}")
    failures: list[tuple[int, str, str]] | None = [] if args.skip_failures else None
    t0 = time.time()
    labelled = label_properties(records, workers=args.workers, failures=failures, progress=not args.no_progress)
    path = write_extxyz(args.out, labelled, require_forces=False)
    summary = {"out": str(path), "labelled": len(labelled), "failed": len(failures or []),
               "wall_time_s": round(time.time() - t0, 1),
               "properties": {"homo": "eV", "lumo": "eV", "gap": "eV", "mu": "D", "dipole_x/y/z": "D"}}
    if failures:
        summary["failures"] = [{"record": i, "mol_id": m, "reason": r} for i, m, r in failures]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .config import load_run_config
    from .evaluation import write_json
    from .train.run import run

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ForceCentricError(f"{str(out)!r} is not empty; pass --overwrite or choose another --out")
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    t0 = time.time()
    quick = {"trainer.max_epochs": 2} if args.quick else {}
    common = {"trainer.progress_bar": not args.no_progress, **quick}
    # --quick pre-trains on the small 66-molecule set instead of the corpus
    small = {"data.train": ["bundled:demo_pretrain"], "data.n_train": None, "data.n_val": 0.1} if args.quick else {}
    print(f"[1/3] force-centric pre-training on the bundled GFN2-xTB corpus -> {out / 'pretrain'}", flush=True)
    pre = run(load_run_config(PRESETS_DIR / "demo_pretrain.yaml",
                              {"run_dir": str(out / "pretrain"), "seed": args.seed, **common, **small}))
    ckpt = out / "pretrain" / "model.ckpt"
    print(f"[2/3] fine-tuning on the held-out molecule (aspirin) from the pre-trained model -> {out / 'finetune'}", flush=True)
    fine = run(load_run_config(PRESETS_DIR / "demo_finetune.yaml",
                               {"run_dir": str(out / "finetune"), "init_from": str(ckpt), "seed": args.seed, **common}))
    scratch = None
    if not args.no_scratch:
        print(f"[3/3] the same fine-tuning from random weights (baseline) -> {out / 'scratch'}", flush=True)
        scratch = run(load_run_config(PRESETS_DIR / "demo_finetune.yaml",
                                      {"run_dir": str(out / "scratch"), "init_from": None, "seed": args.seed, **common}))
    shutil.copyfile(out / "finetune" / "model.ckpt", out / "model.ckpt")
    test = fine["test"]
    metrics = {
        "held_out_molecule": "aspirin",
        "level_of_theory": "GFN2-xTB",
        "units": {"energy_mae": "eV", "force_mae": "eV/A"},
        "force_mae": test["force_mae"],
        "energy_mae": test["energy_mae"],
        "energy_mae_per_atom": test["energy_mae_per_atom"],
        "force_cos": test["force_cos"],
        "n_test": test["n_conformations"],
        "n_finetune_train": fine["train_size"],
        "pretrain": {"val": pre["val"], "train_size": pre["train_size"], "wall_time_s": pre["wall_time_s"]},
        "finetune_wall_time_s": fine["wall_time_s"],
        "wall_time_s": None,
        "version": __version__,
    }
    if scratch is not None:
        st = scratch["test"]
        metrics["scratch"] = {"force_mae": st["force_mae"], "energy_mae": st["energy_mae"]}
        metrics["force_mae_ratio_scratch_over_pretrained"] = st["force_mae"] / test["force_mae"]
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    write_json(metrics, out / "metrics.json")
    print()
    print(f"held-out molecule: aspirin (GFN2-xTB), {metrics['n_test']} test frames, "
          f"{metrics['n_finetune_train']} fine-tuning frames")
    print(f"{'model':<22}{'force MAE (meV/A)':>20}{'energy MAE (meV)':>20}")
    print(f"{'pre-trained + fine-tuned':<22}{1000 * test['force_mae']:>20.1f}{1000 * test['energy_mae']:>20.1f}")
    if scratch is not None:
        print(f"{'from scratch':<22}{1000 * st['force_mae']:>20.1f}{1000 * st['energy_mae']:>20.1f}")
        print(f"force MAE ratio scratch / pre-trained: {metrics['force_mae_ratio_scratch_over_pretrained']:.2f}")
    print(f"wall time {metrics['wall_time_s']:.0f} s; model: {out / 'model.ckpt'}; metrics: {out / 'metrics.json'}")
    return 0


def _dft_settings(args):
    """The DFT settings of the command's --xc, --basis, ... options (see _add_dft_options)."""
    from .data.dft import DFTSettings

    return DFTSettings(xc=args.xc, basis=args.basis, density_fit=not args.no_density_fit,
                       grid_level=args.grid_level, conv_tol=args.conv_tol, max_cycle=args.max_cycle,
                       max_memory_mb=args.max_memory)


def _add_dft_options(sp) -> None:
    sp.add_argument("--xc", default="pbe", help="DFT functional (a PySCF name: pbe, b3lyp, wb97x, ...)")
    sp.add_argument("--basis", default="def2-svp", help="DFT basis set (a PySCF name)")
    sp.add_argument("--no-density-fit", action="store_true", help="exact integrals instead of density fitting (slower)")
    sp.add_argument("--grid-level", type=int, default=3, help="DFT integration grid level (PySCF, 0-9)")
    sp.add_argument("--conv-tol", type=float, default=1e-9, help="SCF energy convergence (Hartree)")
    sp.add_argument("--max-cycle", type=int, default=100, help="SCF iterations before a frame fails")
    sp.add_argument("--max-memory", type=int, default=4000, help="PySCF memory limit (MB)")


def cmd_label(args) -> int:
    from .data.label import label_to_shards, read_molecules

    molecules = []
    for path in args.inputs:
        molecules.extend(read_molecules(path))
    extra = {"n_screen": args.screen}
    if args.embed is not None:
        extra["n_embed"] = args.embed
    if args.level == "dft":
        from .data.dft import require_pyscf

        require_pyscf()  # before any work: without PySCF every molecule would fail on its own
        extra["dft"] = _dft_settings(args)
    report = label_to_shards(
        molecules, args.out, molecules_per_shard=args.shard_molecules, n_workers=args.workers,
        progress=not args.no_progress, n_conformers=args.conformers, md_frames_per_T=args.md_frames,
        temperatures=tuple(args.md_temperatures), n_normal_mode=args.nm_samples,
        normal_mode_temperatures=tuple(args.nm_temperatures), seed=args.seed,
        equilibration_steps=args.md_equilibration, interval_steps=args.md_interval,
        timestep_fs=args.timestep, max_force=args.max_force, **extra,
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_relabel(args) -> int:
    from .data.relabel import relabel_file

    dft = _dft_settings(args)
    select = _key_values(args.select, "--select", "KEY=VALUE, e.g. temperature_K=500.0")
    report = relabel_file(args.inputs, args.out, args.method, n=args.n, seed=args.seed, select=select, dft=dft,
                          threads=args.threads, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0


def cmd_simulate(args) -> int:
    import warnings

    from .md.calculator import Calculator
    from .md.simulate import check_out_dir, md_settings, read_structure, simulate

    steps = args.steps
    if args.time_ps is not None:
        if steps is not None:
            raise ForceCentricError("give either --steps or --time-ps, not both")
        steps = max(1, round(args.time_ps * 1000.0 / args.timestep))
    settings = md_settings(
        temperature=args.temperature, timestep_fs=args.timestep, steps=steps, ensemble=args.ensemble,
        tdamp_fs=args.tdamp, friction_per_fs=args.friction, save_every=args.save_every, log_every=args.log_every,
        seed=args.seed, bond_threshold=args.bond_threshold, min_distance=args.min_distance,
        max_temperature=args.max_temperature,
        trajectory_format=args.format,
    )
    # Every check that can fail runs before the first step; --overwrite deletes nothing until the
    # structure and the model have loaded.
    check_out_dir(args.out, args.resume, args.overwrite)
    atoms, source = read_structure(args.structure, seed=args.seed)
    calc = Calculator(args.model, device=args.device, dtype=args.dtype)
    with warnings.catch_warnings():
        # simulate's warnings (e.g. a large timestep) as one plain line on stderr
        warnings.showwarning = lambda message, *_, **__: print(
            f"forcecentric simulate: warning: {message}", file=sys.stderr)
        summary = simulate(
            calc, atoms, args.out, settings, resume=args.resume, overwrite=args.overwrite,
            progress=not args.no_progress, elements=calc.elements,
            metadata={"model": str(args.model), "structure": source, "device": args.device, "dtype": args.dtype},
        )
    keys = ("steps_completed", "simulated_time_ps", "stable_time_ps", "stopped_reason", "steps_per_second",
            "ns_per_day", "temperature_mean_K", "conserved_energy_drift_eV_per_atom_per_ps")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    if summary["stopped_reason"]:
        print(f"forcecentric simulate: stopped at step {summary['stopped_at_step']} "
              f"({summary['stopped_at_ps']:.3f} ps): {summary['stopped_reason']}; "
              f"trajectory up to the last saved frame is in {args.out} (continue with --resume)", file=sys.stderr)
        return 3
    return 0


def cmd_export(args) -> int:
    from .export import artifact_metadata, export

    out = export(args.model, args.out, dtype=args.dtype)
    meta = artifact_metadata(out)
    print(json.dumps({"artifact": str(out), "bytes": out.stat().st_size,
                      **{k: meta[k] for k in ("elements", "cutoff", "dtype", "units", "package_version")}}, indent=2))
    return 0


def cmd_md_benchmark(args) -> int:
    from .md.benchmark import load_benchmark_config, markdown_table, run_benchmark

    over = _overrides(args.set)
    if args.out:
        over["out"] = args.out
    cfg = load_benchmark_config(preset_path(args.config), over)
    report = run_benchmark(cfg, workers=args.workers, progress=not args.no_progress)
    print(markdown_table(report))
    print(f"results: {Path(cfg.out) / 'md_benchmark.json'} (+ .md and PNG plots)")
    return 0


def cmd_study(args) -> int:
    from .study import load_study_config, run_study, status

    over = _overrides(args.set)
    if args.out:
        over["out"] = args.out
    only = _key_values(args.only, "--only", "KEY=V1,V2", need_value=True,
                       keys=("molecule", "setting", "model", "n_train", "seed", "finetune"))
    filters = {key: values.split(",") for key, values in only.items()}
    cfg = load_study_config(args.config, over)
    if args.phase == "status":
        print(json.dumps(status(cfg), indent=2))
        return 0
    out = run_study(cfg, phase=args.phase, workers=args.workers, accelerator=args.accelerator,
                    threads=args.threads, stop_after_minutes=args.stop_after, progress=not args.no_progress,
                    filters=filters)
    failed = [r for ph in ("pretrain", "finetune") for r in out.get(ph, []) if not r["ok"]]
    if "report" in out:
        print(out["report"]["tables"])
        print(f"results: {cfg.results} ({out['report']['rows']} rows); plots: {cfg.figures}")
    print(json.dumps({"status": status(cfg), "wall_time_s": out["wall_time_s"],
                      "failed": [f"{r['run_dir']}: {r['error']}" for r in failed]}, indent=2))
    return 1 if failed else 0


def cmd_build_data(args) -> int:
    from .data.build import build_store

    report = build_store(
        args.inputs, args.out, format=args.format, max_force=args.max_force,
        min_distance=args.min_distance, dedup=not args.no_dedup, shard_size=args.shard_size,
        progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite,
        select=_key_values(args.select, "--select", "KEY=VALUE, e.g. source=rmd17", need_value=True) or None,
        exclude=_key_values(args.exclude, "--exclude", "KEY=VALUE, e.g. sampling=normal_mode",
                            need_value=True) or None,
    )
    keep = {k: v for k, v in report.items() if k not in ("dropped",)}
    print(json.dumps(keep, indent=2, default=str))
    return 0


def cmd_stage_shards(args) -> int:
    import os

    from .data.store import stage_node_shards

    node = args.node if args.node is not None else int(os.environ.get("SLURM_NODEID", "-1"))
    if node < 0:
        raise ConfigError("stage-shards: give --node (or run it under SLURM, which sets SLURM_NODEID)")
    report = stage_node_shards(args.stores, args.to, node, args.nodes, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0


def _print_summary(metrics: dict) -> None:
    if metrics.get("global_rank", 0):  # distributed runs: rank 0 reports
        return
    keep = {k: v for k, v in metrics.items() if k not in ("val", "test")}
    for split in ("val", "test"):
        if split in metrics:
            keep[split] = {k: v for k, v in metrics[split].items() if k in (
                "force_mae", "energy_mae", "energy_mae_per_atom", "force_cos", "n_conformations",
                "n_molecules", "targets")}
    print(json.dumps(keep, indent=2, default=float))


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="forcecentric",
        description="Force-centric pre-training of equivariant molecular force fields "
        "(Equivariant Transformer; force matching, zero-force regularization, force-based denoising).",
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"forcecentric {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common_train(sp, default_cfg: str | None):
        sp.add_argument("-c", "--config", default=default_cfg,
                        help=("" if default_cfg else "default: the task's preset; ") + "YAML config file or preset name (presets: "
                        f"{', '.join(sorted(x.stem for x in PRESETS_DIR.glob('*.yaml')))})")
        sp.add_argument("--run-dir", help="run directory (overrides run_dir in the config)")
        sp.add_argument("--resume", action="store_true", help="continue a killed run from run_dir/checkpoints/last.ckpt")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value with a dotted key, e.g. --set optim.lr=1e-4 (repeatable)")

    sp = sub.add_parser("pretrain", help="force-centric pre-training on equilibrium and off-equilibrium data",
                        description="Pre-train an Equivariant Transformer with force matching on off-equilibrium "
                        "conformations and zero-force regularization + force-based denoising on equilibrium ones. "
                        "Writes config, metrics.csv, learning_curve.png, checkpoints/, model.ckpt and metrics.json "
                        "to the run directory.", formatter_class=fmt)
    common_train(sp, "pretrain")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("finetune", help="fine-tune energy + forces, or molecular properties, from a pre-trained "
                        "checkpoint (or from scratch)",
                        description="Fine-tune on energies and forces (--task forces, preset 'finetune'): per-element "
                        "reference energies are fitted by least squares on the training energies before training. "
                        "Or fine-tune property heads on the pre-trained representation (--task property --target "
                        "NAME, preset 'property'; 'qm9' has the standard 110,000 / 10,000 / rest split): "
                        "targets mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, Cv, reported in meV, D, a0^3, "
                        "a0^2 and cal/(mol K). Without --from the same run starts from random weights.",
                        formatter_class=fmt)
    common_train(sp, None)
    sp.add_argument("--from", dest="init_from", default=None, help="pre-trained model checkpoint (default: scratch)")
    sp.add_argument("--data", nargs="+", help="training data: files in any supported format (extxyz, "
                    "MD17 npz, QM9, ...) or store directories; overrides data.train")
    sp.add_argument("--task", choices=["forces", "property"], default="forces",
                    help="forces: energies + forces; property: molecular properties (--target)")
    sp.add_argument("--target", nargs="+", metavar="NAME",
                    help="property target(s) for --task property (several: one multi-target model)")
    sp.set_defaults(func=cmd_finetune)

    sp = sub.add_parser("predict", help="a model's predictions for every molecule of a data file, as CSV",
                        description="Runs a property model (its targets, in their data units: eV, D, a0^3, a0^2, "
                        "cal/(mol K)) or a force field (energy, largest force component) on every record and "
                        "writes one CSV row per record; where the data has the reference values, the CSV also "
                        "holds them and the errors, and the MAE is printed in the report units.",
                        formatter_class=fmt)
    sp.add_argument("--model", required=True, help="model checkpoint (model.ckpt or a run's .ckpt)")
    sp.add_argument("--data", required=True, help="data file (any supported format) or store directory")
    sp.add_argument("--format", default=None, help="force the file format (default: guess)")
    sp.add_argument("--out", default=None, help="CSV file (default: DATA_predictions.csv here)")
    sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    sp.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    sp.add_argument("--batch-size", type=int, default=64)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("evaluate", help="energy / force errors of a model on a dataset, with a parity plot",
                        description="Energy MAE (per molecule and per atom), force MAE and RMSE, force cosine "
                        "similarity and per-element force MAE, printed as JSON; with --out also "
                        "NAME_metrics.json and NAME_parity.png.", formatter_class=fmt)
    sp.add_argument("--model", required=True, help="model checkpoint (model.ckpt or a run's .ckpt)")
    sp.add_argument("--data", required=True, nargs="+", help="data files (any supported format) or store directories")
    sp.add_argument("--format", default=None, help="force the file format (default: guess)")
    sp.add_argument("--out", default=None, help="folder for metrics JSON and parity plot")
    sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    sp.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    sp.add_argument("--batch-size", type=int, default=32)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("label", help="GFN2-xTB (or DFT) labelled conformations of molecules (minima, MD, normal modes)",
                        description="RDKit ETKDG conformers optimized with GFN2-xTB (tblite) into minima flagged "
                        "equilibrium, plus off-equilibrium frames from short GFN2-xTB Langevin MD at several "
                        "temperatures and from normal-mode sampling. Runs in parallel processes, writes "
                        "OUT/shard-NNNNN.extxyz atomically and resumes at the first missing shard; failed "
                        "molecules go to OUT/failures.csv. --level dft does the same at DFT level with PySCF "
                        "(minima, Hessians and labels at the reference's own level; seconds per gradient, so keep "
                        "--md-frames 0 unless ab initio MD is meant).", formatter_class=fmt)
    sp.add_argument("inputs", nargs="+", help="SMILES file (SMILES [name] per line), SDF, or structure files")
    sp.add_argument("--out", required=True, help="output folder for the labelled shards")
    sp.add_argument("--workers", type=int, default=2, help="worker processes")
    sp.add_argument("--shard-molecules", type=int, default=50, help="molecules per output shard")
    sp.add_argument("--conformers", type=int, default=2, help="distinct minima per molecule (at most)")
    sp.add_argument("--embed", type=int, default=None,
                    help="RDKit conformers optimized in search of the minima (default: 3 x --conformers)")
    sp.add_argument("--screen", type=int, default=50,
                    help="RDKit conformers embedded and MMFF-optimized first; the --embed optimized are then the "
                    "distinct MMFF minima, lowest first, so that rotamers ETKDG rarely draws are found (ethanol's "
                    "trans: 3 of 30 ETKDG draws). 0 takes the conformers in embedding order, as the bundled "
                    "corpus did")
    sp.add_argument("--md-temperatures", type=float, nargs="+", default=[300.0, 600.0, 900.0], help="MD temperatures (K)")
    sp.add_argument("--md-frames", type=int, default=2, help="MD frames kept per temperature")
    sp.add_argument("--md-equilibration", type=int, default=200, help="MD steps discarded before the first frame")
    sp.add_argument("--md-interval", type=int, default=40, help="MD steps between kept frames")
    sp.add_argument("--timestep", type=float, default=0.5, help="MD time step (fs)")
    sp.add_argument("--nm-temperatures", type=float, nargs="+", default=[300.0, 500.0], help="normal-mode sampling temperatures (K)")
    sp.add_argument("--nm-samples", type=int, default=2, help="normal-mode samples per temperature")
    sp.add_argument("--max-force", type=float, default=10.0, help="drop frames with a force component above this (eV/A)")
    sp.add_argument("--level", choices=["xtb", "dft"], default="xtb",
                    help="who drives the sampling and labels it: GFN2-xTB, or DFT with PySCF (the options below; "
                    "seconds per gradient: minima and normal modes at the reference's own level, --md-frames 0)")
    _add_dft_options(sp)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_label)

    sp = sub.add_parser("relabel", help="new energies and forces (DFT with PySCF, or GFN2-xTB) for given frames",
                        description="The same geometries with new labels: every frame of the inputs, or --n frames "
                        "drawn at random, labelled by a fresh GFN2-xTB or DFT (PySCF) calculation. The workflow: sample "
                        "a molecule cheaply with 'forcecentric label', then label a few frames at the level of theory of "
                        "your reference data and fine-tune on them. Each finished frame is kept in OUT.partial/, so a "
                        "killed run resumes where it stopped; OUT is written, atomically, once every frame is done. "
                        "DFT needs PySCF: pip install 'forcecentric[dft]'.", formatter_class=fmt)
    sp.add_argument("inputs", nargs="+", help="structure files (extxyz, or any format 'forcecentric evaluate' reads)")
    sp.add_argument("--out", required=True, help="output extended-XYZ file (must not exist)")
    sp.add_argument("--method", choices=["dft", "xtb"], default="dft", help="who computes the labels")
    sp.add_argument("--n", type=int, default=None, help="label only N frames drawn at random (default: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random draw of --n frames")
    sp.add_argument("--select", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only frames with this info value (or mol_id, source, level_of_theory), e.g. "
                    "sampling=md; repeatable")
    _add_dft_options(sp)
    sp.add_argument("--threads", type=int, default=None, help="DFT threads (default: all cores)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_relabel)

    sp = sub.add_parser("label-properties", help="GFN2-xTB HOMO, LUMO, gap and dipole of given structures (property data)",
                        description="A GFN2-xTB single point (tblite) of every structure as given (meant for minima, "
                        "e.g. the equilibrium records of 'forcecentric label'): HOMO, LUMO and gap in eV, the dipole "
                        "moment and its components in Debye. Writes an extended-XYZ file that "
                        "'forcecentric finetune --task property' reads. Odd-electron molecules are refused.",
                        formatter_class=fmt)
    sp.add_argument("data", nargs="+", help="structure files (any supported format) or store directories")
    sp.add_argument("--out", required=True, help="extended-XYZ file to write (atomically)")
    sp.add_argument("--format", default=None, help="force the input format (default: guess)")
    sp.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    sp.add_argument("--skip-failures", action="store_true",
                    help="leave out molecules xTB cannot label (listed in the output) instead of stopping")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_label_properties)

    sp = sub.add_parser("build-data", help="validate, deduplicate and pack data files into a sharded HDF5 store",
                        description="Reads every input (MD17/rMD17/MD22 npz, ANI-1x / SPICE HDF5, PCQM4Mv2 / QM9, "
                        "extxyz and anything ASE reads), drops records with NaN/Inf, shape mismatches, force "
                        "components above --max-force or atoms closer than --min-distance, removes duplicates, "
                        "and writes OUT/manifest.json + shards, with build_report.json and dropped.csv "
                        "(file, record, reason). --resume continues a killed build.", formatter_class=fmt)
    sp.add_argument("inputs", nargs="+", help="data files")
    sp.add_argument("--out", required=True, help="store directory")
    sp.add_argument("--format", default=None, help="force a reader (md17, rmd17, md22, ani1x, spice, pcqm4mv2, qm9, ase or an ASE format)")
    sp.add_argument("--max-force", type=float, default=None, help="force bound (eV/A); default: no bound")
    sp.add_argument("--min-distance", type=float, default=0.1, help="minimum interatomic distance (A)")
    sp.add_argument("--shard-size", type=int, default=100_000, help="conformations per shard")
    sp.add_argument("--no-dedup", action="store_true", help="keep duplicate conformations")
    sp.add_argument("--select", action="append", default=[], metavar="KEY=VALUE",
                    help="store only records with this value (mol_id, source, level_of_theory, equilibrium, charge or an "
                    "extxyz info key); repeat for several, all must match")
    sp.add_argument("--exclude", action="append", default=[], metavar="KEY=VALUE",
                    help="leave out records with this value, e.g. sampling=normal_mode for a labelled corpus's "
                    "minima and MD frames only; repeat for several, a record with all of them is left out")
    sp.add_argument("--resume", action="store_true", help="continue a killed build")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing store")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_build_data)

    sp = sub.add_parser("stage-shards", help="copy the store shards one node reads (data.node_local_shards) to its local disk",
                        description="For multi-node training with data.node_local_shards: node n reads only shard s "
                        "with s mod NODES = n (shards numbered over the STOREs in the order of data.train). Copies those "
                        "shards and the manifest to TO/<store name>/ and links the other shards to their originals; "
                        "run it once per node (srun --ntasks-per-node=1) and point data.train at the copies. "
                        "Running it again resumes an interrupted copy. See docs/scale.md.", formatter_class=fmt)
    sp.add_argument("stores", nargs="+", help="the training stores, in the order of data.train")
    sp.add_argument("--to", required=True, help="node-local directory (e.g. $TMPDIR or /local/scratch)")
    sp.add_argument("--nodes", type=int, required=True, help="number of nodes (trainer.num_nodes)")
    sp.add_argument("--node", type=int, default=None, help="this node's number (default: $SLURM_NODEID)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_stage_shards)

    sp = sub.add_parser("simulate", help="molecular dynamics with a model (NVT Nose-Hoover / Langevin or NVE)",
                        description="Runs MD of one molecule with a model checkpoint through ASE's integrators. "
                        "Writes OUT/trajectory.extxyz (every --save-every steps), OUT/thermo.csv, OUT/summary.json "
                        "(steps_completed, stable_time_ps, stopped_reason, steps_per_second, ns_per_day, ...). "
                        "Stops at the first non-finite prediction, bond deviating more than --bond-threshold A "
                        "from the starting structure, two atoms closer than --min-distance A, or temperature "
                        "above --max-temperature; --resume continues "
                        "from the last saved frame. Exit status 3 when the run stopped early.", formatter_class=fmt)
    sp.add_argument("--model", required=True, help="model checkpoint (model.ckpt or a run's .ckpt) or exported artifact")
    sp.add_argument("--structure", required=True, help="starting structure: any ASE-readable file (first frame) or a SMILES")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--temperature", type=float, default=300.0, help="temperature (K)")
    sp.add_argument("--timestep", type=float, default=0.5, help="timestep (fs); a warning above 2 fs")
    sp.add_argument("--steps", type=int, default=None, help="number of steps (default 1000)")
    sp.add_argument("--time-ps", type=float, default=None, help="simulated time (ps) instead of --steps")
    sp.add_argument("--ensemble", default="nose-hoover", choices=["nose-hoover", "langevin", "nve"])
    sp.add_argument("--tdamp", type=float, default=50.0, help="Nose-Hoover chain time constant (fs)")
    sp.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    sp.add_argument("--save-every", type=int, default=10, help="trajectory frame every k steps")
    sp.add_argument("--log-every", type=int, default=None, help="thermo line every k steps (default: --save-every)")
    sp.add_argument("--format", default="extxyz", choices=["extxyz", "traj"], help="trajectory format")
    sp.add_argument("--seed", type=int, default=0, help="seed of initial velocities, Langevin noise and embedding")
    sp.add_argument("--bond-threshold", type=float, default=0.5, help="bond deviation (A) that stops the run")
    sp.add_argument("--min-distance", type=float, default=0.5,
                    help="stop when two atoms come closer than this (A); 0 watches bonds only (Fu et al.)")
    sp.add_argument("--max-temperature", type=float, default=None, help="stop above this temperature (K; default 5x target)")
    sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    sp.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    sp.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved frame")
    sp.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("export", help="write a frozen TorchScript model that runs without the training code",
                        description="Scripts the model with its own neighbour search and writes one file with its "
                        "metadata (elements, cutoff, units, dtype, version). forcecentric.load, forcecentric.Calculator "
                        "and torch.jit.load (Python or C++) read it.", formatter_class=fmt)
    sp.add_argument("--model", required=True, help="model checkpoint (model.ckpt or a run's .ckpt)")
    sp.add_argument("--out", required=True, help="artifact file to write, e.g. model.pt")
    sp.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("md-benchmark", help="MD stability / h(r) benchmark over models, molecules and seeds",
                        description="Runs the protocol of Fu et al. (TMLR 2023) for every model x molecule x seed "
                        "in the config (GFN2-xTB reference runs where no reference frames are given), and writes "
                        "OUT/md_benchmark.json, OUT/md_benchmark.md and PNG plots. Finished runs are skipped and "
                        "interrupted ones resumed when it is run again.", formatter_class=fmt)
    sp.add_argument("-c", "--config", default="md_stability", help="YAML config file or preset name")
    sp.add_argument("--out", default=None, help="output folder (overrides out in the config)")
    sp.add_argument("--workers", type=int, default=1, help="parallel MD processes (one torch thread each)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config value, e.g. --set protocol.steps=2000 (repeatable)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_md_benchmark)

    sp = sub.add_parser("study", help="pre-trained vs scratch fine-tuning study with objective ablations",
                        description="Pre-trains one ET per (setting, objective), fine-tunes each and a "
                        "from-scratch model on held-out targets at several training-set sizes and seeds, and "
                        "writes the results JSON, learning-curve plots and tables. Every job is a run "
                        "directory: finished jobs are skipped, interrupted ones resumed.", formatter_class=fmt)
    sp.add_argument("-c", "--config", default="study", help="YAML config file or preset name")
    sp.add_argument("--phase", default="all", choices=["all", "prepare", "pretrain", "finetune", "report", "status"])
    sp.add_argument("--out", default=None, help="study folder (overrides out in the config)")
    sp.add_argument("--workers", type=int, default=2, help="training processes at a time")
    sp.add_argument("--threads", type=int, default=1, help="torch threads per process")
    sp.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (Lightning accelerator of every job)")
    sp.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                    help="start no new job after this many minutes (run again to continue)")
    sp.add_argument("--only", action="append", metavar="KEY=V1,V2",
                    help="run only jobs whose molecule / setting / model / n_train / seed / finetune (variant) is listed (repeatable)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_study)

    sp = sub.add_parser("demo", help="pre-train, fine-tune on a held-out molecule and evaluate, on bundled data",
                        description="The main job on the bundled GFN2-xTB data: a short force-centric pre-training, "
                        "fine-tuning on aspirin (held out of pre-training) from the pre-trained weights and from "
                        "scratch, evaluation on held-out aspirin frames. Leaves OUT/model.ckpt and "
                        "OUT/metrics.json.", formatter_class=fmt)
    sp.add_argument("--out", default="runs/demo", help="output folder")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sp.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument("--quick", action="store_true", help="2 epochs per stage on the small bundled set "
                    "(a smoke test, not a result)")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ForceCentricError as exc:
        print(f"forcecentric {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
