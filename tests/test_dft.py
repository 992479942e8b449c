"""DFT labels with PySCF (forcecentric.data.dft) and the resumable relabelling driver
(forcecentric.data.relabel, ``forcecentric relabel``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from forcecentric.data import read_all
from forcecentric.data.conformation import Conformation
from forcecentric.errors import DataError, ForceCentricError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pyscf = pytest.importorskip("pyscf")

from forcecentric.data.dft import DFTSettings, dft_labels  # noqa: E402
from forcecentric.data.relabel import relabel, relabel_file  # noqa: E402

# a minimal basis and exact integrals keep the PySCF calls well under a second
FAST = DFTSettings(xc="pbe", basis="sto-3g", density_fit=False)
WATER_Z = np.array([8, 1, 1])
WATER = np.array([[0.0, 0.0, 0.12], [0.0, 0.78, -0.46], [0.05, -0.74, -0.50]])  # a little off its minimum


def test_dft_forces_are_minus_the_gradient_of_the_dft_energy():
    """Units and sign: the forces (eV/Å) match a central difference of the energy (eV) along a
    random direction."""
    energy, forces = dft_labels(WATER_Z, WATER, settings=FAST)
    assert forces.shape == (3, 3) and np.isfinite(energy)
    # the energy is PySCF's total energy converted from Hartree (CODATA: 27.211386 eV)
    from pyscf import dft, gto

    mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(WATER_Z, WATER)], basis="sto-3g", verbose=0)
    mf = dft.RKS(mol)
    mf.xc = "pbe"
    assert energy == pytest.approx(mf.kernel() * 27.211386, abs=1e-4)
    assert np.abs(forces.sum(axis=0)).max() < 2e-3  # no net force on a free molecule
    d = np.random.default_rng(0).normal(size=WATER.shape)
    d /= np.linalg.norm(d)
    h = 2e-3
    e_plus, _ = dft_labels(WATER_Z, WATER + h * d, settings=FAST)
    e_minus, _ = dft_labels(WATER_Z, WATER - h * d, settings=FAST)
    numeric = -(e_plus - e_minus) / (2 * h)
    assert float(np.sum(forces * d)) == pytest.approx(numeric, abs=5e-3, rel=1e-3)
    assert abs(numeric) > 0.1  # the check is not trivially zero


def test_charge_and_spin_choose_the_kohn_sham_flavour():
    """An odd electron count runs unrestricted, with the lowest multiplicity unless one is given;
    an impossible multiplicity or charge is refused before any calculation."""
    oh = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.98]])
    e_radical, f_radical = dft_labels([8, 1], oh, settings=FAST)  # 9 electrons: a doublet
    e_anion, f_anion = dft_labels([8, 1], oh, charge=-1, settings=FAST)  # 10 electrons: a singlet
    e_quartet, _ = dft_labels([8, 1], oh, multiplicity=4, settings=FAST)
    assert np.all(np.isfinite(f_radical)) and np.all(np.isfinite(f_anion))
    assert e_quartet > e_radical  # the high-spin state lies above the doublet
    assert e_anion != pytest.approx(e_radical, abs=0.1)
    with pytest.raises(ValueError, match="multiplicity 1 is impossible with 9 electrons"):
        dft_labels([8, 1], oh, multiplicity=1, settings=FAST)
    with pytest.raises(ValueError, match="leaves -1 electrons"):
        dft_labels([1], [[0.0, 0.0, 0.0]], charge=2, settings=FAST)


def test_an_unconverged_scf_is_an_error_naming_the_file_and_record():
    bad = DFTSettings(xc="pbe", basis="sto-3g", density_fit=False, max_cycle=1, conv_tol=1e-12)
    with pytest.raises(DataError, match=r"file 'frames.xyz', record 7: PBE/sto-3g SCF did not converge in 1 cycles"):
        dft_labels(WATER_Z, WATER, settings=bad, file="frames.xyz", record=7)


def test_level_of_theory_names():
    assert DFTSettings().level_of_theory == "PBE/def2-SVP"
    assert DFTSettings(xc="wb97x", basis="6-31g*").level_of_theory == "WB97X/6-31g*"


@pytest.mark.skipif(not (SHARED_DATA / "botnet_ethanol_rmd17").is_dir(), reason="needs ../shared/data")
def test_the_defaults_reproduce_the_rmd17_labels():
    """PBE/def2-SVP with density fitting gives rMD17's own forces (ORCA, PBE/def2-SVP) on a real
    ethanol frame to about 1 meV/Å, and its energy to about 5 meV."""
    frame = read_all(SHARED_DATA / "botnet_ethanol_rmd17" / "train.xyz")[3]
    energy, forces = dft_labels(frame.z, frame.pos)
    diff = np.abs(forces - frame.forces)
    assert diff.mean() < 3e-3 and diff.max() < 1e-2, diff
    assert energy == pytest.approx(frame.energy, abs=0.02)
    assert np.abs(frame.forces).mean() > 0.5  # a frame with real forces, not a minimum


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "botnet_3bpa").is_dir(), reason="needs ../shared/data")
def test_wb97x_reproduces_the_3bpa_labels():
    """``xc="wb97x", basis="6-31g*"`` with density fitting gives the 3BPA labels (ORCA,
    wB97X/6-31G(d)) back on a real frame: about 4 meV/Å mean absolute force difference, energy
    within about 5 meV (2 minutes on 2 cores)."""
    frame = read_all(SHARED_DATA / "botnet_3bpa" / "train_300K.xyz")[0]
    energy, forces = dft_labels(frame.z, frame.pos, settings=DFTSettings(xc="wb97x", basis="6-31g*"))
    diff = np.abs(forces - frame.forces)
    assert diff.mean() < 8e-3 and diff.max() < 4e-2, diff
    assert energy == pytest.approx(frame.energy, abs=0.02)
    assert np.abs(frame.forces).mean() > 0.5


# ----------------------------------------------------------------------------- relabelling
def _frames(tmp_path, n=6):
    """n water frames with made-up labels of another level of theory, in an extxyz file."""
    from forcecentric.data.label import write_extxyz

    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        pos = WATER + rng.normal(scale=0.03, size=WATER.shape)
        records.append(Conformation(z=WATER_Z, pos=pos, energy=-1.0 * i, forces=np.full((3, 3), float(i)),
                                    level_of_theory="made-up", mol_id="water", source="test",
                                    equilibrium=(i == 0), info={"frame": i, "kind": "even" if i % 2 == 0 else "odd"}))
    path = tmp_path / "frames.extxyz"
    write_extxyz(path, [r.to_atoms() for r in records])
    return path, records


def test_relabel_in_memory_gives_fresh_labels_and_keeps_the_rest(tmp_path):
    _, records = _frames(tmp_path, 3)
    new = relabel(records, "dft", dft=FAST, file="frames")
    for old, rec in zip(records, new):
        energy, forces = dft_labels(old.z, old.pos, settings=FAST)
        assert rec.energy == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(rec.forces, forces, atol=1e-6)
        np.testing.assert_array_equal(rec.pos, old.pos)
        assert rec.level_of_theory == "PBE/sto-3g" and rec.info["relabelled_from"] == "made-up"
        assert (rec.mol_id, rec.source, rec.info["frame"]) == ("water", "test", old.info["frame"])
        assert not rec.equilibrium  # a minimum of one method is not one of another
    assert new[0].info["was_equilibrium"] is True and "was_equilibrium" not in new[1].info
    assert records[1].energy == -1.0 and records[0].equilibrium  # the inputs are not changed
    with pytest.raises(ValueError, match="method must be one of"):
        relabel(records, "ccsd")


def test_relabel_file_resumes_after_a_failure_and_refuses_other_settings(tmp_path, monkeypatch):
    """A frame that fails stops the run with an error naming it; the frames done before it are
    kept and not computed again; the output appears only once all are done, in input order, with
    each frame's index in the inputs."""
    import forcecentric.data.dft as dft_module

    path, records = _frames(tmp_path)
    out = tmp_path / "dft.extxyz"
    calls = []
    real = dft_module.dft_labels

    def failing_on_the_third(z, pos, *args, file=None, record=None, **kw):
        calls.append(record)
        if len(calls) == 3:
            raise DataError("SCF did not converge (injected)", file=file, record=record)
        return real(z, pos, *args, file=file, record=record, **kw)

    monkeypatch.setattr(dft_module, "dft_labels", failing_on_the_third)
    with pytest.raises(DataError, match=r"frames.extxyz', record \d: SCF did not converge"):
        relabel_file([path], out, "dft", n=4, seed=3, dft=FAST, progress=False)
    partial = tmp_path / "dft.extxyz.partial"
    assert not out.exists() and len(list(partial.glob("*.extxyz"))) == 2
    chosen = json.loads((partial / "settings.json").read_text())["chosen"]
    assert len(chosen) == 4 and chosen == sorted(chosen) and calls == chosen[:3]
    # other settings would mix two kinds of labels in one file: refused
    with pytest.raises(ForceCentricError, match=r"differing: dft\)"):
        relabel_file([path], out, "dft", n=4, seed=3, dft=DFTSettings(basis="sto-3g"), progress=False)
    with pytest.raises(ForceCentricError, match="differing: chosen"):
        relabel_file([path], out, "dft", n=4, seed=4, dft=FAST, progress=False)
    calls.clear()
    report = relabel_file([path], out, "dft", n=4, seed=3, dft=FAST, progress=False)
    assert calls == chosen[2:]  # only the frames not done before
    assert (report["frames"], report["labelled_now"], report["resumed"]) == (4, 2, 2)
    assert not partial.exists()
    done = read_all(out)
    assert [r.info["relabel_index"] for r in done] == chosen
    for rec in done:
        old = records[rec.info["relabel_index"]]
        np.testing.assert_allclose(rec.pos, old.pos, atol=1e-8)
        energy, forces = real(old.z, old.pos, settings=FAST)
        assert rec.energy == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(rec.forces, forces, atol=1e-6)
        assert rec.level_of_theory == "PBE/sto-3g" and rec.info["frame"] == old.info["frame"]
    with pytest.raises(ForceCentricError, match="exists"):
        relabel_file([path], out, "dft", dft=FAST, progress=False)


def test_relabel_command_selects_and_labels_with_xtb(tmp_path):
    """``forcecentric relabel --method xtb --select kind=odd``: every odd frame, GFN2-xTB labels
    equal to the in-memory relabelling's."""
    pytest.importorskip("tblite")
    from forcecentric.cli import main

    path, records = _frames(tmp_path)
    out = tmp_path / "xtb.extxyz"
    assert main(["relabel", str(path), "--out", str(out), "--method", "xtb", "--select", "kind=odd",
                 "--no-progress"]) == 0
    done = read_all(out)
    odd = [r for r in records if r.info["kind"] == "odd"]
    assert [r.info["frame"] for r in done] == [1, 3, 5] and [r.info["relabel_index"] for r in done] == [0, 1, 2]
    for rec, ref in zip(done, relabel(odd, "xtb")):
        assert rec.level_of_theory == "GFN2-xTB"
        assert rec.energy == pytest.approx(ref.energy, abs=1e-6)
        np.testing.assert_allclose(rec.forces, ref.forces, atol=1e-6)
    assert main(["relabel", str(path), "--out", str(tmp_path / "none.extxyz"), "--method", "xtb",
                 "--select", "kind=none", "--no-progress"]) != 0
    assert main(["relabel", str(path), "--out", str(tmp_path / "x.extxyz"), "--select", "kind"]) != 0
    with pytest.raises(DataError, match=r"--n 4, but the inputs hold 3 frames matching select"):
        relabel_file([path], tmp_path / "y.extxyz", "xtb", n=4, select={"kind": "odd"}, progress=False)


def test_integer_metadata_survives_a_write_and_a_read(tmp_path):
    """ASE's extxyz parser gives integers as NumPy scalars; the reader keeps them as ints."""
    from forcecentric.data.label import write_extxyz

    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.info.update(frame=np.int64(12), step=3, weight=0.5, tag="x", flag=True)
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((2, 3)))
    write_extxyz(tmp_path / "h2.extxyz", [atoms])
    info = read_all(tmp_path / "h2.extxyz")[0].info
    assert info == {"frame": 12, "step": 3, "weight": 0.5, "tag": "x", "flag": True}
    assert type(info["frame"]) is int and type(info["flag"]) is bool


def _water(positions=WATER) -> Atoms:
    atoms = Atoms(numbers=WATER_Z, positions=positions)
    atoms.info.update(mol_id="water", smiles="O", charge=0)
    return atoms


def test_a_dft_minimum_and_its_normal_modes_match_pyscfs_analytic_hessian():
    """The labeller's steps at DFT level: BFGS through the PySCF calculator reaches the DFT minimum
    (record labelled with the DFT level), and the finite-difference Hessian of ASE's Vibrations gives
    the frequencies of PySCF's own analytic Hessian."""
    from ase import units

    from forcecentric.data.label import normal_modes, optimize_minimum

    minimum = optimize_minimum(_water(), fmax=0.005, dft=FAST)
    assert minimum.info["level_of_theory"] == "PBE/sto-3g" and minimum.info["equilibrium"]
    _, forces = dft_labels(WATER_Z, minimum.positions, settings=FAST)
    assert np.linalg.norm(forces, axis=1).max() < 0.005
    assert minimum.get_forces() == pytest.approx(forces, abs=1e-6)  # the record's labels are DFT's
    # PBE/STO-3G stretches the O-H bond far beyond GFN2-xTB's 0.96 A: the optimizer ran at DFT level
    assert minimum.get_distance(0, 1) == pytest.approx(minimum.get_distance(0, 2), abs=1e-3)
    assert minimum.get_distance(0, 1) > 1.0

    modes, mu, eig = normal_modes(minimum, dft=FAST)
    assert modes.shape == (3, 3, 3) and np.all(eig > 0)
    s = units._hbar * 1e10 / np.sqrt(units._e * units._amu)  # sqrt(eV/(A^2 amu)) -> eV
    ours = np.sqrt(eig) * s / units.invcm

    from pyscf import dft, gto
    from pyscf.hessian import thermo

    mol = gto.M(atom=[(8, tuple(p)) if i == 0 else (1, tuple(p)) for i, p in enumerate(minimum.positions)],
                basis="sto-3g", verbose=0)
    mf = dft.RKS(mol)
    mf.xc = "pbe"
    mf.kernel()
    freqs = thermo.harmonic_analysis(mol, mf.Hessian().kernel())["freq_wavenumber"]
    assert np.sort(ours) == pytest.approx(np.sort(np.real(freqs)), abs=15.0)


def test_label_command_at_dft_level_samples_around_the_dft_minimum(tmp_path):
    """``forcecentric label --level dft``: minima and normal-mode samples with DFT labels that are the
    DFT energies and forces of their own geometries, and a resume stamp naming the DFT level."""
    from forcecentric.cli import main

    smiles = tmp_path / "water.smi"
    smiles.write_text("O water\n")
    out = tmp_path / "labels"
    rc = main(["label", str(smiles), "--out", str(out), "--level", "dft", "--basis", "sto-3g",
               "--no-density-fit", "--conformers", "1", "--md-frames", "0", "--nm-temperatures", "300",
               "--nm-samples", "2", "--workers", "1", "--no-progress"])
    assert rc == 0
    records = read_all(out / "shard-00000.extxyz")
    assert [r.info["sampling"] for r in records] == ["minimum", "normal_mode", "normal_mode"]
    assert {r.level_of_theory for r in records} == {"PBE/sto-3g"}
    for r in records[1:]:
        energy, forces = dft_labels(r.z, r.pos, settings=FAST)
        assert r.energy == pytest.approx(energy, abs=1e-6)
        assert r.forces == pytest.approx(forces, abs=1e-6)
        assert np.abs(r.pos - records[0].pos).max() > 1e-3  # displaced from the minimum
    stamp = json.loads((out / "label_settings.json").read_text())
    assert stamp["method"] == "PBE/sto-3g" and stamp["settings"]["dft"]["basis"] == "sto-3g"
    assert stamp["program"].startswith("pyscf")
