"""Molecular dynamics with any ASE calculator, watched for instability, resumable.

``simulate(calc, atoms, out_dir, settings)`` runs NVT (Nosé–Hoover chain or Langevin, ASE's
integrators) or NVE (velocity Verlet) and writes to ``out_dir``:

- ``trajectory.extxyz`` (or ``trajectory.traj``): one frame every ``save_every`` steps, with
  positions, momenta, energy, forces and ``info`` keys ``step``, ``time_ps``, ``temperature_K``;
- ``thermo.csv``: step, time (ps), potential / kinetic / total energy (eV), temperature (K) and the
  conserved quantity (eV; the Nosé–Hoover chain's extended energy, the total energy otherwise);
- ``reference.xyz``: the starting structure, whose bonds (ASE natural cutoffs) define stability;
- ``state.json``: where to resume from (written atomically after every saved frame);
- ``summary.json``: the outcome (see :func:`simulate`).

The run stops at the first of: a non-finite energy, force or position; a bond of the reference
structure deviating from its length by more than ``bond_threshold`` Å in a saved frame (the
protocol of Fu et al., TMLR 2023); the temperature exceeding ``max_temperature``. What was written
until then stays intact, and ``resume=True`` continues from the last saved frame.

The same code runs forcecentric models (:class:`forcecentric.Calculator`) and reference
calculators such as GFN2-xTB, so model and reference trajectories follow one protocol.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from ..data.conformation import closest_pair
from ..errors import ConfigError, DataError, ElementError, ForceCentricError
from ..evaluation import unknown_elements, write_json
from ..provenance import versions
from .stability import energy_drift, reference_bonds, simulation_speed, worst_bond

#: Above this timestep (fs) hydrogen vibrations are poorly resolved; a warning is issued.
MAX_SANE_TIMESTEP_FS = 2.0
#: Atoms closer than this (Å) in the starting structure are refused as overlapping.
MIN_START_DISTANCE = 0.5
#: Settings that do not change the dynamics and may differ when a run is resumed.
_RESUME_MAY_CHANGE = frozenset({"steps", "bond_threshold", "bond_mult", "max_temperature", "min_distance"})
THERMO_FIELDS = ("step", "time_ps", "epot_eV", "ekin_eV", "etot_eV", "temperature_K", "conserved_eV")


class MDSettings(BaseModel):
    """Settings of one MD run (units: K, fs, Å)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: PositiveFloat = Field(300.0, description="target / initial temperature (K)")
    timestep_fs: PositiveFloat = Field(0.5, description="integration timestep (fs)")
    steps: PositiveInt = Field(1000, description="number of MD steps")
    ensemble: Literal["nose-hoover", "langevin", "nve"] = "nose-hoover"
    tdamp_fs: PositiveFloat = Field(50.0, description="Nosé–Hoover chain time constant (fs)")
    tchain: PositiveInt = 3
    friction_per_fs: PositiveFloat = Field(0.01, description="Langevin friction (1/fs)")
    save_every: PositiveInt = Field(10, description="write a trajectory frame every k steps")
    log_every: PositiveInt | None = Field(None, description="thermo line every k steps (default save_every)")
    seed: int = 0
    bond_threshold: PositiveFloat = Field(0.5, description="bond deviation (Å) that counts as unstable")
    bond_mult: PositiveFloat = Field(1.0, description="multiplier of ASE natural cutoffs for bonds")
    min_distance: float | None = Field(
        0.5, ge=0, description="stop when two atoms come closer than this (A); 0 or None: bonds only (Fu et al.)"
    )
    max_temperature: PositiveFloat | None = Field(
        None, description="stop above this temperature (K); default 5x the target temperature"
    )
    trajectory_format: Literal["extxyz", "traj"] = "extxyz"

    @property
    def temperature_limit(self) -> float:
        return self.max_temperature if self.max_temperature is not None else 5.0 * self.temperature

    @property
    def thermo_every(self) -> int:
        return self.log_every or self.save_every


def md_settings(**kwargs) -> MDSettings:
    """Validated :class:`MDSettings`; bad values raise :class:`ConfigError` naming the field."""
    from ..config import validate

    return validate(MDSettings, {k: v for k, v in kwargs.items() if v is not None}, source="(MD settings)")


class _Stop(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step = step
        self.reason = reason


def read_structure(spec: str, seed: int = 0) -> tuple[Atoms, str]:
    """A starting structure from an ASE-readable file (first frame) or a SMILES (RDKit ETKDG + MMFF).

    Returns the atoms (no periodic boundaries) and a description of where they came from.
    """
    from ase.io import read

    path = Path(spec)
    if path.exists():
        try:
            atoms = read(path, index=0)
        except Exception as exc:  # ASE raises many different types for unreadable files
            raise DataError(f"cannot read a structure: {exc}", file=str(path)) from None
        source = f"file {path}"
    else:
        from ..data.label import embed

        if any(ch in spec for ch in "/\\") or spec.endswith((".xyz", ".extxyz", ".traj", ".pdb", ".cif")):
            raise DataError(f"structure file {spec!r} does not exist")
        try:
            atoms = embed(spec, 1, seed=seed)[0]
        except DataError as exc:
            raise DataError(
                f"structure {spec!r} is neither an existing file nor a usable SMILES ({exc})"
            ) from None
        source = f"SMILES {spec} (RDKit ETKDGv3 + MMFF94, seed {seed})"
    if atoms.pbc.any():
        raise DataError("periodic structures are not supported: MD runs on isolated molecules", file=spec)
    atoms.pbc = False
    atoms.cell = None
    return atoms, source


def _check_elements(atoms: Atoms, where: str, elements: set[int] | None) -> None:
    problem = unknown_elements(elements, atoms.numbers) if elements else None
    if problem:
        raise ElementError(f"{where} ({atoms.get_chemical_formula()}): {problem}")


def check_structure(atoms: Atoms, where: str, elements: set[int] | None = None) -> None:
    """Refuse overlapping atoms, non-finite positions and (when given) elements outside ``elements``."""
    if len(atoms) < 2:
        raise DataError(f"{where}: MD needs at least 2 atoms, got {len(atoms)}")
    if not np.all(np.isfinite(atoms.positions)):
        raise DataError(f"{where}: positions are not finite")
    _check_elements(atoms, where, elements)
    dmin, (i, j) = closest_pair(atoms.positions)
    if dmin < MIN_START_DISTANCE:
        raise DataError(
            f"{where}: atoms {i} and {j} overlap ({dmin:.3f} A apart, below {MIN_START_DISTANCE} A)"
        )


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create ``out_dir`` and prove it is writable; refuse an existing run unless resuming or
    overwriting. Removes nothing."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ForceCentricError(f"output directory {out} is not writable: {exc.strerror or exc}") from None
    has_run = (out / "state.json").exists() or (out / "summary.json").exists()
    if has_run and not (resume or overwrite):
        raise ForceCentricError(
            f"{out} already holds an MD run: pass --resume to continue it or --overwrite to start over"
        )
    if resume and not (out / "state.json").exists():
        raise ForceCentricError(f"nothing to resume in {out}: no state.json (start a new run without --resume)")
    return out


_RUN_FILES = ("state.json", "summary.json", "thermo.csv", "reference.xyz", "settings.json",
              "trajectory.extxyz", "trajectory.traj")


def _integrator(atoms: Atoms, s: MDSettings):
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    dt = s.timestep_fs * units.fs
    if s.ensemble == "nose-hoover":
        return NoseHooverChainNVT(
            atoms, timestep=dt, temperature_K=s.temperature, tdamp=s.tdamp_fs * units.fs, tchain=s.tchain
        )
    if s.ensemble == "langevin":
        from ase.constraints import FixCom

        atoms.set_constraint(FixCom())  # ASE's recommended way to keep the molecule in place
        return Langevin(
            atoms, timestep=dt, temperature_K=s.temperature, friction=s.friction_per_fs / units.fs,
            fixcm=False, rng=np.random.default_rng(s.seed),
        )
    return VelocityVerlet(atoms, timestep=dt)


def _integrator_state(dyn) -> dict[str, Any]:
    state: dict[str, Any] = {}
    thermostat = getattr(dyn, "_thermostat", None)
    if thermostat is not None:
        state["nhc_eta"] = thermostat._eta.tolist()
        state["nhc_p_eta"] = thermostat._p_eta.tolist()
    rng = getattr(dyn, "rng", None)
    if isinstance(rng, np.random.Generator):
        state["rng"] = rng.bit_generator.state
    return state


def _restore_integrator_state(dyn, state: dict[str, Any]) -> None:
    thermostat = getattr(dyn, "_thermostat", None)
    if thermostat is not None and "nhc_eta" in state:
        thermostat._eta = np.asarray(state["nhc_eta"], dtype=float)
        thermostat._p_eta = np.asarray(state["nhc_p_eta"], dtype=float)
    rng = getattr(dyn, "rng", None)
    if isinstance(rng, np.random.Generator) and "rng" in state:
        rng.bit_generator.state = state["rng"]


def _conserved(dyn, atoms: Atoms, etot: float) -> float:
    thermostat = getattr(dyn, "_thermostat", None)
    if thermostat is not None:
        return etot + float(thermostat.get_thermostat_energy())
    return etot


class _Writer:
    """Appends frames and thermo lines; records byte offsets so a resume can cut partial writes."""

    def __init__(self, out: Path, fmt: str):
        self.fmt = fmt
        self.traj_path = out / f"trajectory.{fmt}"
        self.thermo_path = out / "thermo.csv"
        self.frames = 0

    def open(self, fresh: bool, state: dict[str, Any] | None) -> None:
        if fresh:
            self.traj_path.unlink(missing_ok=True)
            with open(self.thermo_path, "w", newline="") as f:
                csv.writer(f).writerow(THERMO_FIELDS)
            self.frames = 0
            return
        assert state is not None
        with open(self.thermo_path, "r+b") as f:
            f.truncate(state["thermo_bytes"])
        self.frames = int(state["frames"])
        if self.fmt == "extxyz":
            with open(self.traj_path, "r+b") as f:
                f.truncate(state["traj_bytes"])
        else:
            from ase.io import Trajectory

            with Trajectory(self.traj_path) as t:
                n = len(t)
                keep = [t[i] for i in range(min(n, self.frames))] if n != self.frames else None
            if keep is not None:
                tmp = self.traj_path.with_suffix(".traj.tmp")
                with Trajectory(tmp, "w") as t:
                    for a in keep:
                        t.write(a)
                os.replace(tmp, self.traj_path)

    def frame(self, atoms: Atoms, step: int, time_ps: float, energy: float, forces: np.ndarray) -> None:
        frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, momenta=atoms.get_momenta(), pbc=False)
        frame.info.update(step=int(step), time_ps=float(time_ps),
                          temperature_K=float(atoms.get_temperature()))
        frame.calc = SinglePointCalculator(frame, energy=float(energy), forces=np.array(forces))
        if self.fmt == "extxyz":
            from ase.io.extxyz import write_extxyz

            buf = io.StringIO()
            write_extxyz(buf, [frame])
            with open(self.traj_path, "a") as f:
                f.write(buf.getvalue())
                f.flush()
        else:
            from ase.io import Trajectory

            with Trajectory(self.traj_path, "a") as t:
                t.write(frame)
        self.frames += 1

    def thermo(self, row: tuple) -> None:
        with open(self.thermo_path, "a", newline="") as f:
            csv.writer(f).writerow([f"{v:.15g}" if isinstance(v, float) else v for v in row])

    def offsets(self) -> dict[str, int]:
        return {
            "traj_bytes": self.traj_path.stat().st_size if self.traj_path.exists() else 0,
            "thermo_bytes": self.thermo_path.stat().st_size,
            "frames": self.frames,
        }


def read_thermo(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a ``thermo.csv`` as float arrays."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in THERMO_FIELDS}


def simulate(
    calc,
    atoms: Atoms,
    out_dir: str | Path,
    settings: MDSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    elements: set[int] | None = None,
) -> dict[str, Any]:
    """Run MD of ``atoms`` with the ASE calculator ``calc``; returns (and writes) the summary.

    Args:
        calc: any ASE calculator giving energy and forces (eV, eV/Å).
        atoms: the starting structure (ignored on resume: the run continues from its last frame).
        out_dir: run directory (created; must be writable).
        settings: :class:`MDSettings`. On resume only the settings that leave the dynamics
            unchanged may differ (steps, bond_threshold, bond_mult, max_temperature, min_distance).
        resume: continue the run in ``out_dir`` from its last saved frame.
        overwrite: replace a run already in ``out_dir``.
        progress: show a tqdm bar with the simulated time and ns/day.
        metadata: extra JSON-able entries for ``summary.json`` (model, structure source...).
        elements: atomic numbers the calculator supports, checked before the run starts.

    Returns:
        The summary: ``steps_completed``, ``simulated_time_ps``, ``stable_time_ps``,
        ``stopped_reason`` (None when the run reached ``settings.steps``), ``stopped_at_step``,
        ``steps_per_second``, ``ns_per_day``, temperature statistics, energy drift (eV/atom/ps of the
        conserved quantity), the settings, versions and ``metadata``.
    """
    from ase.io import read, write
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    s = settings
    if s.timestep_fs > MAX_SANE_TIMESTEP_FS:
        warnings.warn(
            f"timestep {s.timestep_fs} fs is above {MAX_SANE_TIMESTEP_FS} fs: bonds to hydrogen are "
            "poorly resolved and the run may blow up for numerical rather than model reasons",
            stacklevel=2,
        )
    out = check_out_dir(out_dir, resume, overwrite)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if resume else None
    writer = _Writer(out, s.trajectory_format)

    if state is None:
        atoms = atoms.copy()
        check_structure(atoms, "starting structure", elements)
        for name in _RUN_FILES:  # --overwrite: the old run goes only once the new one can start
            (out / name).unlink(missing_ok=True)
        write(out / "reference.xyz", atoms, format="extxyz")
        write_json({"settings": s.model_dump(), "metadata": metadata or {}}, out / "settings.json")
        rng = np.random.default_rng(s.seed)
        thermalize_momenta(atoms, temperature_K=s.temperature, rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        start_step = 0
        writer.open(fresh=True, state=None)
    else:
        stored = json.loads((out / "settings.json").read_text())["settings"]
        changed = {k for k, v in s.model_dump().items() if k not in _RESUME_MAY_CHANGE and stored.get(k) != v}
        if changed:
            raise ConfigError(
                f"cannot resume {out} with different settings ({', '.join(sorted(changed))}); "
                f"only {', '.join(sorted(_RESUME_MAY_CHANGE))} may change"
            )
        writer.open(fresh=False, state=state)
        last = read(writer.traj_path, index=-1)
        atoms = Atoms(numbers=last.numbers, positions=last.positions, pbc=False)
        atoms.set_momenta(last.get_momenta())
        start_step = int(state["step"])
        _check_elements(atoms, f"cannot resume {out} with this model", elements)

    reference = read(out / "reference.xyz")
    pairs, lengths = reference_bonds(reference, mult=s.bond_mult)
    atoms.calc = calc
    dyn = _integrator(atoms, s)
    dyn.nsteps = start_step
    if state is not None:
        _restore_integrator_state(dyn, state.get("integrator", {}))

    n_atoms = len(atoms)
    dt_ps = s.timestep_fs * 1e-3
    todo = s.steps - start_step
    stop: _Stop | None = None
    bar = None
    if progress and todo > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start_step, unit="step", dynamic_ncols=True,
                   desc=f"MD {atoms.get_chemical_formula()}")
    t0 = time.perf_counter()
    steps_run = 0

    first_stop = (state or {}).get("first_stop")

    def checkpoint(step: int) -> None:
        st = {"step": step, **writer.offsets(), "integrator": _integrator_state(dyn), "first_stop": first_stop}
        write_json(st, state_path)

    def steps():
        """dyn.irun, turning a calculator's refusal (non-finite prediction) into a stop at its step."""
        it = dyn.irun(todo) if todo > 0 else iter(())
        while True:
            try:
                next(it)
            except StopIteration:
                return
            except DataError as exc:
                failed = dyn.nsteps if dyn.nsteps == start_step and state is None else dyn.nsteps + 1
                raise _Stop(failed, f"non-finite prediction: {exc}") from None
            yield dyn.nsteps

    try:
        for step in steps():
            if step == start_step and state is not None:
                continue  # already written before the resume
            steps_run = step - start_step
            pos = atoms.positions
            epot = float(atoms.get_potential_energy())
            forces = atoms.get_forces()
            if not (math.isfinite(epot) and np.all(np.isfinite(forces)) and np.all(np.isfinite(pos))):
                raise _Stop(step, "non-finite energy, forces or positions")
            ekin = float(atoms.get_kinetic_energy())
            temp = float(atoms.get_temperature())
            if step % s.thermo_every == 0:
                etot = epot + ekin
                writer.thermo((step, step * dt_ps, epot, ekin, etot, temp, _conserved(dyn, atoms, etot)))
            if step % s.save_every == 0:
                writer.frame(atoms, step, step * dt_ps, epot, forces)
                checkpoint(step)
                k, dev = worst_bond(pos, pairs, lengths)
                if abs(dev) > s.bond_threshold:
                    i, j = pairs[k]
                    raise _Stop(step, f"bond {i}-{j} deviates {dev:+.2f} A from its reference length "
                                      f"{lengths[k]:.2f} A (threshold {s.bond_threshold} A)")
                if s.min_distance:
                    dmin, (i, j) = closest_pair(pos)
                    if dmin < s.min_distance:
                        sym = atoms.get_chemical_symbols()
                        raise _Stop(step, f"atoms {i} ({sym[i]}) and {j} ({sym[j]}) collapsed to {dmin:.2f} A "
                                          f"apart (below min_distance {s.min_distance} A)")
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.n = step
                    if el > 0 and steps_run:
                        bar.set_postfix(T=f"{temp:.0f}K", ps=f"{step * dt_ps:.2f}",
                                        ns_day=f"{simulation_speed(steps_run, s.timestep_fs, el)['ns_per_day']:.3f}",
                                        refresh=False)
                    bar.refresh()
            if temp > s.temperature_limit:
                raise _Stop(step, f"temperature runaway: {temp:.0f} K above the limit "
                                  f"{s.temperature_limit:.0f} K")
    except _Stop as exc:
        stop = exc
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0

    # state.json points at the last frame written (for a bond stop, the first unstable frame), so
    # a stopped run resumes from there; the first stop of the run's history fixes its stable time.
    if stop is not None:
        steps_completed = stop.step
        if first_stop is None:
            first_stop = {"step": stop.step, "reason": stop.reason}
            st = json.loads(state_path.read_text()) if state_path.exists() else None
            if st is not None:
                st["first_stop"] = first_stop
                write_json(st, state_path)
    else:
        steps_completed = s.steps
    stable_time = (first_stop["step"] if first_stop else steps_completed) * dt_ps
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    summary = _summary(out, s, n_atoms, atoms, steps_completed, stable_time, stop, steps_run, wall,
                       metadata, previous)
    summary["first_stop"] = first_stop
    write_json(summary, out / "summary.json")
    return summary


def _summary(out, s, n_atoms, atoms, steps_completed, stable_time, stop, steps_run, wall, metadata, previous):
    thermo = read_thermo(out / "thermo.csv")
    speed = simulation_speed(steps_run, s.timestep_fs, wall) if steps_run and wall > 0 else {
        "steps_per_second": previous.get("steps_per_second"), "ns_per_day": previous.get("ns_per_day")}
    drift = None
    if len(thermo["time_ps"]) >= 2:
        drift = energy_drift(thermo["time_ps"], thermo["conserved_eV"], n_atoms)
    n_eq = len(thermo["temperature_K"]) // 5  # skip the first fifth as equilibration
    temps = thermo["temperature_K"][n_eq:] if len(thermo["temperature_K"]) else np.array([np.nan])
    return {
        "steps_completed": int(steps_completed),
        "steps_requested": int(s.steps),
        "simulated_time_ps": steps_completed * s.timestep_fs * 1e-3,
        "stable_time_ps": float(stable_time),
        "stopped_reason": None if stop is None else stop.reason,
        "stopped_at_step": None if stop is None else int(stop.step),
        "stopped_at_ps": None if stop is None else stop.step * s.timestep_fs * 1e-3,
        "steps_per_second": speed["steps_per_second"],
        "ns_per_day": speed["ns_per_day"],
        "wall_s": float(wall) + float(previous.get("wall_s", 0.0) or 0.0),
        "temperature_mean_K": float(np.mean(temps)),
        "temperature_std_K": float(np.std(temps)),
        "conserved_energy_drift_eV_per_atom_per_ps": drift,
        "n_atoms": int(n_atoms),
        "formula": atoms.get_chemical_formula(),
        "trajectory": f"trajectory.{s.trajectory_format}",
        "frames_saved": int(_count_frames(out, s)),
        "settings": s.model_dump(),
        "metadata": metadata or {},
        "versions": versions(),
    }


def _count_frames(out: Path, s: MDSettings) -> int:
    state = out / "state.json"
    return int(json.loads(state.read_text())["frames"]) if state.exists() else 0
