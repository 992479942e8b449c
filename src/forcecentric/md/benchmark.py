"""MD-stability benchmark: several models x molecules x seeds under one protocol (Fu et al., TMLR 2023).

Configured by YAML (``configs/md_stability.yaml`` is the preset)::

    out: runs/md_benchmark
    protocol: {temperature: 500, timestep_fs: 0.5, ensemble: nose-hoover, steps: 20000, save_every: 20}
    seeds: [0, 1, 2]
    molecules:
      ethanol:
        structure: ../shared/data/botnet_ethanol_rmd17/test_MD.xyz   # first frame starts every run
        reference: ../shared/data/botnet_ethanol_rmd17/test_MD.xyz   # frames for the reference h(r)
      aspirin:
        structure: bundled:demo_target
        reference: xtb            # GFN2-xTB MD (tblite) with the same protocol, seed 0
    models:                       # {molecule} is replaced by the molecule's name
      scratch: runs/exp/finetune_scratch_{molecule}/model.ckpt

Each run lives in ``out/runs/<model>/<molecule>/seed<k>/`` and is resumed or skipped when the
benchmark is run again. Results: ``out/md_benchmark.json`` (every run and the per model x molecule
table), ``out/md_benchmark.md`` and PNG plots (stable time per model, h(r) against the reference,
energy traces).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, DataError
from ..provenance import machine_info
from .simulate import MDSettings, check_structure, read_thermo
from .stability import distance_histogram, first_unstable_frame, hr_mae, reference_bonds

HR_BINS = 500
HR_RMAX = 10.0


class MoleculeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    structure: str = Field(description="file (first frame is used), bundled:NAME, or SMILES")
    reference: str | None = Field(
        None, description="file of reference frames for h(r), or 'xtb' for a GFN2-xTB run; None: no h(r) MAE"
    )
    reference_steps: int | None = Field(None, description="steps of the xTB reference run (default: protocol)")


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = "runs/md_benchmark"
    protocol: MDSettings = MDSettings(temperature=500.0, timestep_fs=0.5, steps=20000, save_every=20)
    seeds: list[int] = [0, 1, 2]
    device: str = "cpu"
    dtype: str = "float32"
    molecules: dict[str, MoleculeSpec]
    models: dict[str, str] = Field(description="name -> checkpoint path; '{molecule}' is substituted")


def load_benchmark_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read an MD benchmark YAML, apply dotted-key ``overrides`` and validate."""
    from ..config import apply_overrides, load_yaml, validate

    raw = apply_overrides(load_yaml(path), overrides or {})
    return validate(BenchmarkConfig, raw, source=repr(str(path)))


def _resolve(spec: str) -> str:
    from ..train.datamodule import resolve_path

    return str(resolve_path(spec)) if spec.startswith("bundled:") else spec


def _start_structure(spec: MoleculeSpec, seed: int = 0):
    from .simulate import read_structure

    atoms, _ = read_structure(_resolve(spec.structure), seed=seed)
    atoms.info.clear()
    return atoms


def _read_positions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Positions (T, N, 3) of every frame of an ASE-readable file and their ``time_ps`` (NaN if absent)."""
    from ase.io import read

    try:
        frames = read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise DataError(f"cannot read frames: {exc}", file=str(path)) from None
    times = np.array([float(a.info.get("time_ps", np.nan)) for a in frames])
    return np.stack([a.positions for a in frames]), times


def _run_one(task: dict[str, Any]) -> dict[str, Any]:
    """One MD run in a worker process (also used in-process when workers == 1)."""
    import torch

    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    from ase import Atoms

    from .simulate import md_settings, simulate

    settings = md_settings(**task["settings"])
    atoms = Atoms(numbers=task["numbers"], positions=task["positions"])
    out = Path(task["out"])
    done = out / "summary.json"
    if done.exists():
        summary = json.loads(done.read_text())
        if summary["steps_completed"] >= settings.steps or summary["stopped_reason"]:
            return summary
    if task["model"] == "xtb":
        from ..data.label import xtb_calculator

        calc, elements = xtb_calculator(), None
    else:
        from .calculator import Calculator

        calc = Calculator(task["model"], device=task["device"], dtype=task["dtype"])
        elements = calc.elements
    resume = (out / "state.json").exists()
    return simulate(calc, atoms, out, settings, resume=resume, progress=task.get("progress", False),
                    metadata={"model": task["model"], "molecule": task["molecule"], "seed": task["seed"]},
                    elements=elements)


def run_benchmark(cfg: BenchmarkConfig, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every model x molecule x seed run and the xTB references; write the report."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tasks: list[dict[str, Any]] = []
    starts = {}
    for mol, spec in cfg.molecules.items():
        atoms = _start_structure(spec)
        check_structure(atoms, f"molecule {mol!r} ({spec.structure})")
        starts[mol] = atoms
        if spec.reference == "xtb":
            ref_settings = cfg.protocol.model_copy(update={"seed": 0})
            if spec.reference_steps:
                ref_settings = ref_settings.model_copy(update={"steps": spec.reference_steps})
            tasks.append(_task(cfg, "xtb", mol, 0, atoms, out / "reference" / mol, ref_settings))
        for name, pattern in cfg.models.items():
            ckpt = pattern.replace("{molecule}", mol)
            if not Path(ckpt).is_file():
                raise ConfigError(f"model {name!r} for molecule {mol!r}: checkpoint {ckpt} does not exist")
            # refuse a model that cannot run the molecule now, not after hours of other runs
            check_structure(atoms, f"molecule {mol!r} with model {name!r} ({ckpt})", _elements(ckpt))
            for seed in cfg.seeds:
                s = cfg.protocol.model_copy(update={"seed": seed})
                tasks.append(_task(cfg, ckpt, mol, seed, atoms, out / "runs" / name / mol / f"seed{seed}", s,
                                   model_name=name))
    threads = 1 if workers > 1 else None
    for t in tasks:
        t["threads"] = threads
    if workers > 1:
        from tqdm.auto import tqdm

        from ..workers import process_pool

        with process_pool(workers) as pool:
            futures = [pool.submit(_run_one, t) for t in tasks]
            for f in tqdm(futures, desc="MD runs", disable=not progress):
                f.result()
    else:
        for t in tasks:
            t["progress"] = progress
            _run_one(t)
    report = analyse(cfg, starts)
    report["wall_s"] = time.perf_counter() - t_start
    report["workers"] = workers
    write_report(report, out)
    return report


def _elements(ckpt: str) -> set[int]:
    from ..checkpoint import load

    return set(getattr(load(ckpt), "elements", []) or [])


def _task(cfg, model, mol, seed, atoms, out, settings, model_name=None) -> dict[str, Any]:
    return {"model": model, "model_name": model_name or model, "molecule": mol, "seed": seed,
            "numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(), "out": str(out),
            "settings": settings.model_dump(), "device": cfg.device, "dtype": cfg.dtype}


def _reference_hr(mol: str, spec: MoleculeSpec, out: Path) -> tuple[np.ndarray | None, str | None]:
    if spec.reference is None:
        return None, None
    if spec.reference == "xtb":
        run = out / "reference" / mol
        summary = json.loads((run / "summary.json").read_text())
        pos, _ = _read_positions(run / summary["trajectory"])
        source = f"GFN2-xTB MD ({summary['steps_completed']} steps, stable {summary['stable_time_ps']:.1f} ps)"
    else:
        path = Path(_resolve(spec.reference))
        pos, _ = _read_positions(path)
        source = f"{path} ({len(pos)} frames)"
    return distance_histogram(pos, bins=HR_BINS, r_max=HR_RMAX)[1], source


def analyse(cfg: BenchmarkConfig, starts: dict) -> dict[str, Any]:
    """Stability, h(r) MAE and speed of every finished run, and the per model x molecule table."""
    out = Path(cfg.out)
    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    traces: dict[str, dict[str, Any]] = {}
    references: dict[str, str | None] = {}
    for mol, spec in cfg.molecules.items():
        h_ref, references[mol] = _reference_hr(mol, spec, out)
        pairs, lengths = reference_bonds(starts[mol], mult=cfg.protocol.bond_mult)
        curves[mol] = {"reference": None if h_ref is None else h_ref.tolist()}
        traces[mol] = {}
        if spec.reference == "xtb":
            th = read_thermo(out / "reference" / mol / "thermo.csv")
            traces[mol]["GFN2-xTB"] = (th["time_ps"].tolist(), th["epot_eV"].tolist())
        for name in cfg.models:
            pooled = []
            for seed in cfg.seeds:
                run = out / "runs" / name / mol / f"seed{seed}"
                summary = json.loads((run / "summary.json").read_text())
                pos, times = _read_positions(run / summary["trajectory"])
                # Stability from the saved frames: Fu et al.'s bond criterion alone, and together
                # with the collapse watcher (min_distance) that `simulate` also applies.
                k_bond = first_unstable_frame(pos, pairs, lengths, cfg.protocol.bond_threshold)
                k = first_unstable_frame(pos, pairs, lengths, cfg.protocol.bond_threshold,
                                         cfg.protocol.min_distance or None)
                if summary["stopped_reason"] and not summary["stopped_reason"].startswith(("bond", "atoms")):
                    k = len(pos) if k is None else k  # non-finite or temperature stop after the last frame
                end = summary["stable_time_ps"]

                def time_of(frame):
                    return end if frame is None or frame >= len(times) else float(times[frame])

                stable_pos = pos[:k] if k is not None else pos
                row = {
                    "model": name, "molecule": mol, "seed": seed,
                    "stable_time_ps": min(time_of(k), end),
                    "bond_stable_time_ps": min(time_of(k_bond), end),
                    "simulated_time_ps": summary["simulated_time_ps"],
                    "stopped_reason": summary["stopped_reason"],
                    "steps_per_second": summary["steps_per_second"],
                    "ns_per_day": summary["ns_per_day"],
                    "conserved_energy_drift_eV_per_atom_per_ps": summary["conserved_energy_drift_eV_per_atom_per_ps"],
                    "temperature_mean_K": summary["temperature_mean_K"],
                    "frames_for_hr": int(len(stable_pos)),
                    "hr_mae": None,
                }
                if len(stable_pos) >= 2:
                    h = distance_histogram(stable_pos, bins=HR_BINS, r_max=HR_RMAX)[1]
                    pooled.append((h, len(stable_pos)))
                    if h_ref is not None:
                        row["hr_mae"] = hr_mae(h, h_ref, r_max=HR_RMAX)
                runs.append(row)
                if seed == cfg.seeds[0]:
                    th = read_thermo(run / "thermo.csv")
                    traces[mol][name] = (th["time_ps"].tolist(), th["epot_eV"].tolist())
            if pooled:
                w = np.array([n for _, n in pooled], dtype=float)
                curves[mol][name] = (np.sum([h * n for h, n in pooled], axis=0) / w.sum()).tolist()
    table = []
    for mol in cfg.molecules:
        for name in cfg.models:
            rows = [r for r in runs if r["model"] == name and r["molecule"] == mol]
            st = np.array([r["stable_time_ps"] for r in rows])
            bst = np.array([r["bond_stable_time_ps"] for r in rows])
            end = cfg.protocol.steps * cfg.protocol.timestep_fs * 1e-3
            maes = [r["hr_mae"] for r in rows if r["hr_mae"] is not None]
            sps = [r["steps_per_second"] for r in rows if r["steps_per_second"]]
            drifts = [1000 * r["conserved_energy_drift_eV_per_atom_per_ps"] for r in rows
                      if r["conserved_energy_drift_eV_per_atom_per_ps"] is not None]
            table.append({
                "model": name, "molecule": mol, "runs": len(rows),
                "runs_stable_to_end": int(np.sum(st >= end - 1e-9)),
                "stable_time_ps_mean": float(st.mean()), "stable_time_ps_std": float(st.std()),
                "stable_time_ps_median": float(np.median(st)),
                "bond_stable_time_ps_mean": float(bst.mean()), "bond_stable_time_ps_std": float(bst.std()),
                "hr_mae_mean": float(np.mean(maes)) if maes else None,
                "hr_mae_std": float(np.std(maes)) if maes else None,
                "steps_per_second_median": float(np.median(sps)) if sps else None,
                "conserved_drift_meV_per_atom_per_ps_median": float(np.median(drifts)) if drifts else None,
            })
    return {
        "protocol": cfg.protocol.model_dump(), "seeds": cfg.seeds, "molecules": {k: v.model_dump() for k, v in cfg.molecules.items()},
        "models": cfg.models, "references": references, "table": table, "runs": runs,
        "hr": {"bins": HR_BINS, "r_max": HR_RMAX, "curves": curves}, "energy_traces": traces,
        "machine": machine_info(cfg.device),
    }


def markdown_table(report: dict[str, Any]) -> str:
    p = report["protocol"]
    lines = [
        f"MD stability: {p['ensemble']} at {p['temperature']:g} K, {p['timestep_fs']:g} fs, "
        f"{p['steps']} steps ({p['steps'] * p['timestep_fs'] * 1e-3:g} ps), frames every {p['save_every']} steps, "
        f"seeds {report['seeds']}. Unstable from the first saved frame in which a bond deviates more than "
        f"{p['bond_threshold']:g} A from its starting length (Fu et al.)"
        + (f" or two atoms come closer than {p['min_distance']:g} A" if p.get("min_distance") else "") + "; "
        "the bond-only column is Fu et al.'s criterion alone (a lower bound where the collapse watcher stopped a run). "
        "h(r) MAE over the stable frames; drift: median "
        "slope of the conserved quantity (with the thermostat's energy for Nose-Hoover).",
        "",
        "| molecule | model | stable time (ps) | stable to the end | bond-only stable time (ps) | h(r) MAE "
        "| conserved-energy drift (meV/atom/ps) | steps/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["table"]:
        hr = "n/a" if r["hr_mae_mean"] is None else f"{r['hr_mae_mean']:.3f} ± {r['hr_mae_std']:.3f}"
        sps = "n/a" if r["steps_per_second_median"] is None else f"{r['steps_per_second_median']:.0f}"
        drift = r.get("conserved_drift_meV_per_atom_per_ps_median")
        drift = "n/a" if drift is None else f"{drift:+.3f}"
        lines.append(f"| {r['molecule']} | {r['model']} | {r['stable_time_ps_mean']:.2f} ± {r['stable_time_ps_std']:.2f} "
                     f"| {r['runs_stable_to_end']}/{r['runs']} "
                     f"| {r['bond_stable_time_ps_mean']:.2f} ± {r['bond_stable_time_ps_std']:.2f} | {hr} | {drift} | {sps} |")
    lines += ["", "h(r) references: " + "; ".join(f"{m}: {s}" for m, s in report["references"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    from ..evaluation import write_json
    from ..plots import md_energy_traces, md_hr_curves, md_stable_times

    write_json(report, out / "md_benchmark.json")
    tmp = out / "md_benchmark.md.tmp"
    tmp.write_text(markdown_table(report))
    os.replace(tmp, out / "md_benchmark.md")
    md_stable_times(report["table"], report["protocol"], out / "stable_time.png")
    for mol, curves in report["hr"]["curves"].items():
        md_hr_curves(curves, report["hr"]["r_max"], mol, out / f"hr_{mol}.png")
        md_energy_traces(report["energy_traces"][mol], mol, out / f"energy_{mol}.png")
