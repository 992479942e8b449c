"""`forcecentric simulate`, the MD watchers, resume, and the md-benchmark."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes
from ase.io import read, write

from forcecentric.cli import main
from forcecentric.errors import DataError, ElementError, ForceCentricError
from forcecentric.md.simulate import md_settings, read_thermo, simulate
from forcecentric.md.stability import first_unstable_frame, reference_bonds


@pytest.fixture
def ethanol_file(tmp_path):
    path = tmp_path / "ethanol.xyz"
    write(path, molecule("CH3CH2OH"))
    return path


class PullApart(AseCalculator):
    """Harmonic springs on the bonds of the first structure it sees (a stable, conservative toy force
    field), plus a constant force ``pull`` (eV/A) driving atom 0 away from atom 1; NaN forces from call
    ``nan_at`` on; KeyboardInterrupt at call ``interrupt_at``."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, pull: float = 0.0, k: float = 20.0, nan_at: int | None = None,
                 interrupt_at: int | None = None, reference: Atoms | None = None, pair=(0, 1),
                 refuse_at: int | None = None):
        super().__init__()
        self.pair = pair
        self.refuse_at = refuse_at
        self.pull, self.k, self.nan_at, self.interrupt_at = pull, k, nan_at, interrupt_at
        self.calls = 0
        self.bonds = None if reference is None else reference_bonds(reference)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.refuse_at is not None and self.calls >= self.refuse_at:
            raise DataError("model predicted a non-finite energy or forces")  # as forcecentric.Calculator does
        pos = self.atoms.positions
        if self.bonds is None:
            self.bonds = reference_bonds(self.atoms)
        pairs, d0 = self.bonds
        v = pos[pairs[:, 1]] - pos[pairs[:, 0]]
        d = np.linalg.norm(v, axis=1)
        e = 0.5 * self.k * float(np.sum((d - d0) ** 2))
        g = (self.k * (d - d0) / d)[:, None] * v  # dE/d(pos_j) for each bond
        f = np.zeros_like(pos)
        np.add.at(f, pairs[:, 0], g)
        np.add.at(f, pairs[:, 1], -g)
        a, b = self.pair
        u = (pos[a] - pos[b]) / np.linalg.norm(pos[a] - pos[b])
        f[a] += self.pull * u
        e -= self.pull * float(np.linalg.norm(pos[a] - pos[b]))
        if self.nan_at is not None and self.calls >= self.nan_at:
            f[:] = np.nan
        self.results = {"energy": e, "forces": f}


def test_simulate_cli_contract(tmp_path, model_path, ethanol_file):
    out = tmp_path / "md"
    rc = main(["simulate", "--model", str(model_path), "--structure", str(ethanol_file), "--temperature", "300",
               "--timestep", "0.25", "--steps", "40", "--save-every", "10", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_completed"] == 40
    assert summary["stopped_reason"] is None
    assert summary["stable_time_ps"] == pytest.approx(0.01)
    assert summary["steps_per_second"] > 0 and summary["ns_per_day"] > 0
    frames = read(out / "trajectory.extxyz", index=":")
    assert [a.info["step"] for a in frames] == [0, 10, 20, 30, 40]
    assert frames[-1].get_momenta().shape == (9, 3) and np.abs(frames[-1].get_momenta()).sum() > 0
    assert np.isfinite(frames[-1].get_forces()).all()
    thermo = read_thermo(out / "thermo.csv")
    assert list(thermo["step"]) == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(thermo["etot_eV"], thermo["epot_eV"] + thermo["ekin_eV"], rtol=1e-9)


def test_simulate_from_smiles_with_langevin(tmp_path, model_path):
    out = tmp_path / "md"
    rc = main(["simulate", "--model", str(model_path), "--structure", "CCO", "--ensemble", "langevin",
               "--steps", "10", "--save-every", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["formula"] == "C2H6O" and "SMILES CCO" in summary["metadata"]["structure"]


def test_model_drives_nve_and_conserves_energy(tmp_path, model_path):
    """The model's forces are -dE/dx: velocity Verlet at a small step conserves E_pot + E_kin."""
    from forcecentric import Calculator

    calc = Calculator(model_path, dtype="float64")
    s = md_settings(ensemble="nve", temperature=300, timestep_fs=0.25, steps=400, save_every=10, log_every=1,
                    bond_threshold=5.0, min_distance=0)  # untrained model: only conservation is tested
    summary = simulate(calc, molecule("CH3CH2OH"), tmp_path / "nve", s, progress=False)
    th = read_thermo(tmp_path / "nve" / "thermo.csv")
    assert summary["stopped_reason"] is None
    assert np.ptp(th["epot_eV"]) > 0.03  # the atoms really moved on the model's surface
    assert np.max(np.abs(th["etot_eV"] - th["etot_eV"][0])) < 0.01 * np.ptp(th["epot_eV"])
    assert abs(summary["conserved_energy_drift_eV_per_atom_per_ps"]) < 0.05


def test_bond_stretch_stops_at_the_first_unstable_frame_and_resumes(tmp_path):
    out = tmp_path / "md"
    s = md_settings(temperature=50, timestep_fs=0.5, steps=400, save_every=5, ensemble="nose-hoover",
                    max_temperature=1e5)
    atoms = molecule("CH3CH2OH")
    summary = simulate(PullApart(pull=30.0), atoms, out, s, progress=False)
    assert summary["stopped_reason"].startswith("bond ")
    step = summary["stopped_at_step"]
    assert step % 5 == 0 and 0 < step < 400
    assert summary["stable_time_ps"] == pytest.approx(step * 0.5e-3)
    frames = read(out / "trajectory.extxyz", index=":")
    pos = np.stack([a.positions for a in frames])
    pairs, lengths = reference_bonds(atoms)
    k = first_unstable_frame(pos, pairs, lengths, 0.5)
    assert k == len(frames) - 1 and frames[k].info["step"] == step  # the last frame written is the first bad one
    # a stopped run resumes from its last frame; its stable time stays that of the first stop
    s2 = md_settings(temperature=50, timestep_fs=0.5, steps=step + 20, save_every=5, bond_threshold=50.0,
                     max_temperature=1e5)
    again = simulate(PullApart(pull=0.0), None, out, s2, resume=True, progress=False)
    assert again["steps_completed"] == step + 20 and again["stopped_reason"] is None
    assert again["stable_time_ps"] == pytest.approx(step * 0.5e-3)
    steps = [a.info["step"] for a in read(out / "trajectory.extxyz", index=":")]
    assert steps == list(range(0, step + 21, 5))


def test_atoms_collapsing_onto_each_other_stop_the_run(tmp_path):
    """Two hydrogens of one carbon pushed together: every bond keeps its length (Fu et al.'s
    criterion stays blind) but the collapse watcher stops the run."""
    atoms = molecule("CH3CH2OH")
    pairs, _ = reference_bonds(atoms)
    h = [int(j) for i, j in pairs if atoms.numbers[i] == 6 and atoms.numbers[j] == 1]
    h += [int(i) for i, j in pairs if atoms.numbers[j] == 6 and atoms.numbers[i] == 1]
    carbon_of = {k: int(i if atoms.numbers[j] == 1 else j) for i, j in pairs for k in (i, j)
                 if atoms.numbers[k] == 1 and 6 in (atoms.numbers[i], atoms.numbers[j])}
    h1, h2 = next((a, b) for a in h for b in h if a < b and carbon_of[a] == carbon_of[b])
    s = md_settings(temperature=20, timestep_fs=0.25, steps=2000, save_every=5, max_temperature=1e6)
    summary = simulate(PullApart(pull=-8.0, pair=(h1, h2), k=80.0), atoms, tmp_path / "md", s, progress=False)
    assert summary["stopped_reason"].startswith(f"atoms {h1} (H) and {h2} (H) collapsed")
    frames = read(tmp_path / "md" / "trajectory.extxyz", index=":")
    pos = np.stack([a.positions for a in frames])
    pairs, lengths = reference_bonds(atoms)
    assert first_unstable_frame(pos, pairs, lengths, 0.5) is None  # bonds alone see nothing
    assert first_unstable_frame(pos, pairs, lengths, 0.5, min_distance=0.5) == len(frames) - 1
    assert summary["stable_time_ps"] == pytest.approx(frames[-1].info["time_ps"])


def test_non_finite_forces_stop_the_run_and_keep_the_trajectory(tmp_path):
    out = tmp_path / "md"
    s = md_settings(temperature=100, timestep_fs=0.5, steps=100, save_every=10)
    summary = simulate(PullApart(nan_at=35), molecule("CH3CH2OH"), out, s, progress=False)
    assert "non-finite" in summary["stopped_reason"]
    assert summary["stopped_at_step"] == 34  # call 1 is step 0
    frames = read(out / "trajectory.extxyz", index=":")
    assert [a.info["step"] for a in frames] == [0, 10, 20, 30]
    assert all(np.isfinite(a.positions).all() for a in frames)
    assert json.loads((out / "state.json").read_text())["step"] == 30


@pytest.mark.parametrize("call, step", [(1, 0), (24, 23)])
def test_calculator_refusing_a_prediction_stops_the_run(tmp_path, call, step):
    """forcecentric.Calculator raises DataError on non-finite predictions inside the integrator."""
    s = md_settings(temperature=100, timestep_fs=0.5, steps=50, save_every=10)
    summary = simulate(PullApart(refuse_at=call), molecule("CH3CH2OH"), tmp_path / "md", s, progress=False)
    assert summary["stopped_reason"].startswith("non-finite prediction")
    assert summary["stopped_at_step"] == step and summary["stable_time_ps"] == pytest.approx(step * 0.5e-3)
    assert json.loads((tmp_path / "md" / "summary.json").read_text())["steps_completed"] == step


def test_temperature_runaway_stops(tmp_path):
    s = md_settings(temperature=300, timestep_fs=0.5, steps=50, save_every=10, max_temperature=1.0)
    summary = simulate(PullApart(), molecule("CH3CH2OH"), tmp_path / "md", s, progress=False)
    assert summary["stopped_reason"].startswith("temperature runaway")


@pytest.mark.parametrize("ensemble", ["nose-hoover", "langevin"])
def test_killed_run_resumes_where_it_stopped(tmp_path, ensemble):
    s = md_settings(temperature=300, timestep_fs=0.5, steps=60, save_every=10, ensemble=ensemble, seed=3)
    atoms = molecule("CH3CH2OH")
    ref = simulate(PullApart(reference=atoms), atoms, tmp_path / "ref", s, progress=False)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        simulate(PullApart(interrupt_at=26, reference=atoms), atoms, out, s, progress=False)  # dies in step 25
    # a write cut short by the kill: garbage after the last checkpoint is discarded on resume
    with open(out / "trajectory.extxyz", "a") as f:
        f.write("9\nLattice=partial")
    with open(out / "thermo.csv", "a") as f:
        f.write("25,0.0125,")
    resumed = simulate(PullApart(reference=atoms), None, out, s, resume=True, progress=False)
    assert resumed["steps_completed"] == ref["steps_completed"] == 60
    a = read(out / "trajectory.extxyz", index=":")
    b = read(tmp_path / "ref" / "trajectory.extxyz", index=":")
    assert [x.info["step"] for x in a] == [x.info["step"] for x in b]
    np.testing.assert_allclose(a[-1].positions, b[-1].positions, atol=1e-4)
    assert list(read_thermo(out / "thermo.csv")["step"]) == list(range(0, 61, 10))


def test_existing_run_is_not_clobbered(tmp_path):
    s = md_settings(steps=10, save_every=5)
    simulate(PullApart(), molecule("H2O"), tmp_path / "md", s, progress=False)
    with pytest.raises(ForceCentricError, match="--resume"):
        simulate(PullApart(), molecule("H2O"), tmp_path / "md", s, progress=False)
    with pytest.raises(ForceCentricError, match="timestep_fs"):
        simulate(PullApart(), None, tmp_path / "md", md_settings(steps=20, timestep_fs=1.0, save_every=5),
                 resume=True, progress=False)


def test_bad_inputs_fail_before_the_run(tmp_path, model_path, ethanol_file, capsys):
    from forcecentric import Calculator

    calc = Calculator(model_path)
    s = md_settings(steps=10)
    silane = Atoms("SiH4", positions=[[0, 0, 0], [0.9, 0.9, 0.9], [-0.9, -0.9, 0.9], [-0.9, 0.9, -0.9], [0.9, -0.9, -0.9]])
    with pytest.raises(ElementError, match="Si"):
        simulate(calc, silane, tmp_path / "a", s, progress=False, elements=calc.elements)
    assert not (tmp_path / "a" / "trajectory.extxyz").exists()
    squashed = molecule("CH3CH2OH")
    squashed.positions[1] = squashed.positions[0] + [0.1, 0, 0]
    with pytest.raises(DataError, match="overlap"):
        simulate(calc, squashed, tmp_path / "b", s, progress=False)
    with pytest.warns(UserWarning, match="timestep"):
        simulate(PullApart(), molecule("H2O"), tmp_path / "c", md_settings(steps=2, timestep_fs=3.0), progress=False)

    def cli(*extra):
        return main(["simulate", "--model", str(model_path), "--structure", str(ethanol_file), "--steps", "5",
                     "--no-progress", *extra])

    assert cli("--out", str(tmp_path / "d"), "--model", str(tmp_path / "missing.ckpt")) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert cli("--out", str(tmp_path / "e"), "--model", str(bad)) == 2
    assert "bad.ckpt" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli("--out", str(blocker / "run")) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["simulate", "--model", str(model_path), "--structure", "no/such/file.xyz", "--out",
                 str(tmp_path / "f"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli("--out", str(tmp_path / "g"), "--timestep", "-1") == 2
    assert "timestep_fs" in capsys.readouterr().err
    assert cli("--out", str(tmp_path / "h"), "--timestep", "3", "--min-distance", "0", "--bond-threshold", "50") in (0, 3)
    assert "forcecentric simulate: warning: timestep 3.0 fs is above 2.0 fs" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("FORCECENTRIC_NO_XTB") == "1", reason="xTB disabled")
def test_md_benchmark_end_to_end(tmp_path, model_path, morse_file, capsys):
    pytest.importorskip("tblite")
    import yaml

    cfg = {
        "out": str(tmp_path / "bench"),
        "protocol": {"temperature": 300, "timestep_fs": 0.5, "steps": 30, "save_every": 5},
        "seeds": [0, 1],
        "molecules": {
            "ethanol": {"structure": str(morse_file), "reference": str(morse_file)},
            "water": {"structure": "O", "reference": "xtb", "reference_steps": 20},
        },
        "models": {"a": str(model_path), "b": str(model_path)},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # in worker processes (one torch thread each); the resume below runs in this process
    assert main(["md-benchmark", "-c", str(path), "--no-progress", "--workers", "2"]) == 0
    report = json.loads((tmp_path / "bench" / "md_benchmark.json").read_text())
    assert len(report["runs"]) == 2 * 2 * 2 and len(report["table"]) == 4
    assert all(0 <= r["hr_mae"] <= 2 for r in report["runs"])
    assert report["references"]["water"].startswith("GFN2-xTB MD (20 steps")
    for r in report["table"]:
        assert r["runs"] == 2 and r["stable_time_ps_mean"] <= 0.015 + 1e-12
    for name in ("md_benchmark.md", "stable_time.png", "hr_ethanol.png", "hr_water.png", "energy_water.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    # a model that cannot run a molecule is refused before any run starts
    bad = dict(cfg, out=str(tmp_path / "bench2"), molecules={"silane": {"structure": "[SiH4]"}})
    path2 = tmp_path / "bench2.yaml"
    path2.write_text(yaml.safe_dump(bad))
    assert main(["md-benchmark", "-c", str(path2), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "silane" in err and "Si" in err and "model 'a'" in err
    assert not (tmp_path / "bench2" / "runs").exists()
    # a second call re-analyses without re-running, and runs only what is missing
    runs = tmp_path / "bench" / "runs"
    mtime = (runs / "a" / "water" / "seed0" / "trajectory.extxyz").stat().st_mtime
    shutil.rmtree(runs / "b" / "water" / "seed1")
    assert main(["md-benchmark", "-c", str(path), "--no-progress"]) == 0
    assert (runs / "a" / "water" / "seed0" / "trajectory.extxyz").stat().st_mtime == mtime
    assert (runs / "b" / "water" / "seed1" / "trajectory.extxyz").stat().st_size > 0
    again = json.loads((tmp_path / "bench" / "md_benchmark.json").read_text())
    assert len(again["runs"]) == len(report["runs"])


def test_ase_trajectory_format_and_resume(tmp_path):
    from ase.io import Trajectory

    s = md_settings(temperature=300, steps=40, save_every=10, trajectory_format="traj")
    atoms = molecule("CH3CH2OH")
    out = tmp_path / "md"
    with pytest.raises(KeyboardInterrupt):
        simulate(PullApart(interrupt_at=32, reference=atoms), atoms, out, s, progress=False)
    with Trajectory(out / "trajectory.traj") as t:
        assert len(t) == 4  # steps 0, 10, 20, 30
    summary = simulate(PullApart(reference=atoms), None, out, s, resume=True, progress=False)
    assert summary["steps_completed"] == 40 and summary["frames_saved"] == 5
    with Trajectory(out / "trajectory.traj") as t:
        assert [a.info["step"] for a in t] == [0, 10, 20, 30, 40]
        assert np.isfinite(t[-1].get_momenta()).all() and np.abs(t[-1].get_momenta()).sum() > 0
