"""Tests of the GFN2-xTB labeller (forcecentric.data.label) and of the bundled demo data."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

pytest.importorskip("rdkit")
pytest.importorskip("tblite")

import ase.io  # noqa: E402

from forcecentric.data import label as L  # noqa: E402
from forcecentric.errors import DataError  # noqa: E402

FMAX = 0.01
TINY = dict(
    n_conformers=1,
    md_frames_per_T=2,
    temperatures=(300.0,),
    n_normal_mode=2,
    normal_mode_temperatures=(400.0,),
    n_embed=1,
    equilibration_steps=10,
    interval_steps=5,
    fmax=FMAX,
)


@pytest.fixture(scope="module")
def methanol():
    dropped: list = []
    records = L.label_molecule("methanol", "CO", seed=0, source="test", dropped=dropped, **TINY)
    return records, dropped


def _fresh(atoms: Atoms) -> tuple[float, np.ndarray]:
    a = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    a.calc = L.xtb_calculator(charge=int(atoms.info["charge"]))
    return a.get_potential_energy(), a.get_forces()


def test_records_carry_labels_and_info(methanol):
    records, dropped = methanol
    assert not dropped
    kinds = [r.info["sampling"] for r in records]
    assert kinds == ["minimum", "md", "md", "normal_mode", "normal_mode"]
    for r in records:
        assert list(r.info) == list(L.INFO_KEYS)
        assert isinstance(r.info["equilibrium"], bool)
        assert r.info["equilibrium"] == (r.info["sampling"] == "minimum")
        assert r.info["source"] == "test"
        assert r.info["mol_id"] == "methanol" and r.info["smiles"] == "CO"
        assert r.info["level_of_theory"] == "GFN2-xTB"
        assert r.info["charge"] == 0 and isinstance(r.info["charge"], int)
        assert isinstance(r.info["temperature_K"], float)
        assert isinstance(r.calc, SinglePointCalculator)
        assert sorted(r.get_chemical_symbols()) == ["C", "H", "H", "H", "H", "O"]
        assert r.get_forces().shape == (6, 3)
        assert np.isfinite(r.get_potential_energy())
    assert [r.info["temperature_K"] for r in records] == [0.0, 300.0, 300.0, 400.0, 400.0]


def test_minimum_is_converged(methanol):
    minimum = methanol[0][0]
    assert minimum.info["equilibrium"] is True
    assert np.linalg.norm(minimum.get_forces(), axis=1).max() < FMAX
    # thermal frames sit above the minimum
    assert all(r.get_potential_energy() > minimum.get_potential_energy() for r in methanol[0][1:])


def test_thermal_labels_equal_fresh_xtb(methanol):
    for r in methanol[0][1:]:
        assert r.info["equilibrium"] is False
        f = r.get_forces()
        assert np.all(np.isfinite(f)) and np.abs(f).max() > 0.05  # really off-equilibrium
        e_ref, f_ref = _fresh(r)
        assert r.get_potential_energy() == pytest.approx(e_ref, abs=1e-5)
        np.testing.assert_allclose(f, f_ref, atol=1e-4)


def test_labelling_is_deterministic(methanol):
    again = L.label_molecule("methanol", "CO", seed=0, source="test", **TINY)
    for a, b in zip(methanol[0], again):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-6)


def test_extxyz_round_trip(methanol, tmp_path):
    records = methanol[0]
    path = L.write_extxyz(tmp_path / "sub" / "methanol.extxyz", records)
    assert sorted(p.name for p in path.parent.iterdir()) == ["methanol.extxyz"]  # no temp left
    back = ase.io.read(path, ":")
    assert len(back) == len(records)
    for a, b in zip(records, back):
        assert np.array_equal(a.numbers, b.numbers)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-7)
        for key in L.INFO_KEYS:
            assert b.info[key] == a.info[key], key
        assert isinstance(b.info["equilibrium"], (bool, np.bool_))
    # overwriting goes through the same atomic path
    L.write_extxyz(path, records[:2])
    assert len(ase.io.read(path, ":")) == 2


def test_write_extxyz_refuses_bad_records(methanol, tmp_path):
    good = methanol[0][0]
    bare = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    with pytest.raises(DataError, match="record 1"):
        L.write_extxyz(tmp_path / "x.extxyz", [good, bare])
    nan = good.copy()
    f = good.get_forces().copy()
    f[0, 0] = np.nan
    nan.calc = SinglePointCalculator(nan, energy=good.get_potential_energy(), forces=f)
    with pytest.raises(DataError, match="non-finite"):
        L.write_extxyz(tmp_path / "x.extxyz", [nan])
    numeric = good.copy()
    numeric.calc = SinglePointCalculator(numeric, energy=1.0, forces=np.zeros((6, 3)))
    numeric.info["mol_id"] = "123"  # would come back as an int
    with pytest.raises(DataError, match="mol_id"):
        L.write_extxyz(tmp_path / "x.extxyz", [numeric])
    assert not list(tmp_path.iterdir())


def test_filter_frames_drops_outliers_and_reports():
    def frame(positions, forces):
        a = Atoms("OH2", positions=positions)
        a.calc = SinglePointCalculator(a, energy=0.0, forces=np.asarray(forces, float))
        return a

    water = [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]
    ok = frame(water, np.ones((3, 3)))
    hot = frame(water, [[0, 0, 12.0], [0, 0, -6], [0, 0, -6]])
    close = frame([[0, 0, 0], [0.3, 0, 0], [-0.24, 0.93, 0]], np.zeros((3, 3)))
    apart = frame([[0, 0, 0], [0.96, 0, 0], [-2.4, 9.3, 0]], np.zeros((3, 3)))
    kept, dropped = L.filter_frames([ok, hot, close, apart], max_fragments=1)
    assert kept == [ok]
    assert [i for i, _ in dropped] == [1, 2, 3]
    assert "force" in dropped[0][1] and "apart" in dropped[1][1] and "fragments" in dropped[2][1]
    bad = frame(water, [[np.inf, 0, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(DataError, match="non-finite"):
        L.filter_frames([ok, bad])


def test_normal_modes_of_methanol(methanol, tmp_path):
    modes, mu, eigvals = L.normal_modes(methanol[0][0])
    assert modes.shape == (12, 6, 3) and mu.shape == (12,) and eigvals.shape == (12,)
    np.testing.assert_allclose(np.linalg.norm(modes.reshape(12, -1), axis=1), 1.0, atol=1e-10)
    assert np.all(eigvals > 0)  # a true minimum: no imaginary modes once rigid ones are removed
    # same vibrational frequencies as ASE's own analysis (which keeps the rigid modes)
    from ase import units
    from ase.vibrations import Vibrations

    hbar_scale = units._hbar * 1e10 / np.sqrt(units._e * units._amu)
    ours = hbar_scale * np.sqrt(eigvals) / units.invcm
    ref_atoms = Atoms(numbers=methanol[0][0].numbers, positions=methanol[0][0].positions)
    ref_atoms.calc = L.xtb_calculator()
    vib = Vibrations(ref_atoms, name=str(tmp_path / "vib"))
    vib.run()
    ref = np.sort(vib.get_vibrations().get_frequencies().real)[-12:]
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1.0)


def test_embed_rejects_bad_input():
    with pytest.raises(DataError, match="cannot parse"):
        L.embed("C1CC", 1, name="broken")
    with pytest.raises(DataError, match="open-shell"):
        L.embed("[CH3]", 1, name="methyl")
    with pytest.raises(DataError, match="disconnected"):
        L.embed("C.O", 1, name="mixture")
    # RDKit gives every conformer the same coordinates at seed 0; embed maps it to another seed
    for seed in (0, 3):
        confs = L.embed("CCCCO", 12, seed=seed, mmff=False)
        assert len({tuple(np.round(c.positions.ravel(), 3)) for c in confs}) == 12, seed
    confs = L.embed("CCO", 2, seed=3, name="ethanol")
    assert len(confs) == 2 and len(confs[0]) == 9
    mmff_energy = confs[0].info.pop("mmff_energy")
    assert confs[0].info == {"mol_id": "ethanol", "smiles": "CCO", "charge": 0}
    assert -1.0 < mmff_energy < 1.0  # eV: ethanol's MMFF94 energy is -1.3 kcal/mol


def _stereo_smiles(atoms) -> str:
    """The stereoisomer a geometry is (bonds and stereochemistry perceived from 3D)."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    xyz = f"{len(atoms)}\n\n" + "\n".join(f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in
                                         zip(atoms.get_chemical_symbols(), atoms.positions))
    mol = Chem.MolFromXYZBlock(xyz)
    rdDetermineBonds.DetermineBonds(mol, charge=0)
    Chem.AssignStereochemistryFrom3D(mol)
    return Chem.MolToSmiles(Chem.RemoveHs(mol))


# the bridged bicycle: half its stereocentre assignments cannot exist in 3D, and ETKDG spent minutes
# on one when the labeller took the first enumerated stereoisomer
@pytest.mark.parametrize("smiles", ["CC(O)CC(C)N", "OC1CCC(O)CC1", "CC=CC(C)O", "Clc1ncc(C2CC3CCC2N3)cn1"])
def test_embed_fixes_one_stereoisomer_when_the_smiles_leaves_it_open(smiles):
    """ETKDG alone draws each conformer's unspecified centres and double bonds at random, so the
    conformers would be a mixture of diastereomers; embed gives all of them one stereoisomer."""
    from rdkit import Chem

    confs = L.embed(smiles, 12, seed=7)
    isomers = {_stereo_smiles(c) for c in confs}
    assert len(isomers) == 1
    # the library's reader of a record's stereoisomer (from its SMILES graph) agrees with a
    # perception of bonds and stereo from the coordinates alone
    assert {L.stereo_smiles(c) for c in confs} == isomers
    assert Chem.MolToSmiles(Chem.MolFromSmiles(next(iter(isomers))), isomericSmiles=False) == \
        Chem.MolToSmiles(Chem.MolFromSmiles(smiles))
    # stereochemistry written in the SMILES is kept, whichever it is
    for given in ("C[C@H](O)C[C@@H](C)N", "C[C@@H](O)C[C@@H](C)N"):
        found = {_stereo_smiles(c) for c in L.embed(given, 6, seed=7)}
        assert found == {Chem.MolToSmiles(Chem.MolFromSmiles(given))}


def test_stereo_smiles_reads_the_geometry_and_refuses_a_mismatch():
    from rdkit import Chem

    for given in ("C[C@H](O)CC", "C[C@@H](O)CC", "F/C=C/F", "F/C=C\\F"):
        conf = L.embed(given, 1, seed=1)[0]
        assert L.stereo_smiles(conf) == Chem.MolToSmiles(Chem.MolFromSmiles(given))
        mirror = conf.copy()
        mirror.positions[:, 0] *= -1
        if "@" in given:
            assert L.stereo_smiles(mirror) != L.stereo_smiles(conf)
    with pytest.raises(DataError, match="not SMILES 'CCO'"):
        L.stereo_smiles(conf, "CCO")
    conf.info.pop("smiles")
    with pytest.raises(DataError, match="no parsable SMILES"):
        L.stereo_smiles(conf)


def test_optimize_minimum_detects_fragmentation():
    argon = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 2.0]], info={"mol_id": "argon_dimer"})
    with pytest.raises(DataError, match="argon_dimer.*fragmented"):
        L.optimize_minimum(argon, steps=200)


def test_label_molecules_collects_failures_and_keeps_order():
    molecules = [("water", "O"), ("broken", "C1CC"), ("methane", "C")]
    dropped: list = []
    records, failures = L.label_molecules(
        molecules, seed=1, n_workers=2, dropped=dropped, **{**TINY, "n_normal_mode": 0}
    )
    assert not dropped
    assert [name for name, _ in failures] == ["broken"]
    assert "SMILES" in failures[0][1]
    ids = [r.info["mol_id"] for r in records]
    assert ids == ["water"] * 3 + ["methane"] * 3
    # per-molecule streams do not depend on the other molecules or on the workers
    no_nm = {**TINY, "n_normal_mode": 0}
    alone, _ = L.label_molecules([("methane", "C")], seed=1, n_workers=1, **no_nm)
    for a, b in zip(records[3:], alone):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
    with pytest.raises(DataError, match="duplicate"):
        L.label_molecules([("a", "C"), ("a", "CC")])


# ------------------------------------------------------------------------------------------
# bundled demo data
# ------------------------------------------------------------------------------------------

BUNDLED = files("forcecentric") / "bundled"


@pytest.fixture(scope="module")
def bundled():
    out = {}
    for name in ("demo_pretrain.extxyz", "demo_target.extxyz"):
        res = BUNDLED / name
        assert res.is_file(), f"bundled file {name} missing (run scripts/make_demo_data.py)"
        out[name] = ase.io.read(str(res), ":")
    return out["demo_pretrain.extxyz"], out["demo_target.extxyz"]


def test_bundled_files_parse_and_are_labelled(bundled):
    for records in bundled:
        assert len(records) > 100
        for r in records:
            assert set(L.INFO_KEYS) <= set(r.info)
            assert r.info["level_of_theory"] == "GFN2-xTB"
            f = r.get_forces()
            assert f.shape == (len(r), 3) and np.all(np.isfinite(f))
            assert np.isfinite(r.get_potential_energy())
            assert np.abs(f).max() <= 10.0


def test_bundled_target_is_held_out(bundled):
    pretrain, target = bundled
    target_ids = {str(r.info["mol_id"]) for r in target}
    pretrain_ids = {str(r.info["mol_id"]) for r in pretrain}
    assert target_ids == {"aspirin"}
    assert not target_ids & pretrain_ids
    assert not {r.info["smiles"] for r in target} & {r.info["smiles"] for r in pretrain}
    assert not any(bool(r.info["equilibrium"]) for r in target)
    assert len(target) >= 300


def test_bundled_pretrain_mixes_equilibrium_and_thermal(bundled):
    pretrain, _ = bundled
    eq = [r for r in pretrain if r.info["equilibrium"]]
    assert 0.1 < len(eq) / len(pretrain) < 0.3
    assert all(np.linalg.norm(r.get_forces(), axis=1).max() < 0.01 for r in eq)
    assert {r.info["sampling"] for r in pretrain} == {"minimum", "md", "normal_mode"}
    elements = set().union(*(r.get_chemical_symbols() for r in pretrain))
    assert {"H", "C", "N", "O"} <= elements
    assert len({r.info["mol_id"] for r in pretrain}) >= 15


def test_relabel_xtb_replaces_labels_and_keeps_geometry_and_metadata(methanol):
    """relabel_xtb: GFN2-xTB labels at unchanged positions. Records of another level of theory (here
    methanol frames with made-up labels) get the labels a fresh GFN2-xTB call gives; the rest of each
    record stays, and the old level of theory is kept in info."""
    from forcecentric.data.conformation import Conformation

    atoms = methanol[0][1:4]
    other = [Conformation(z=a.numbers, pos=a.positions, energy=-1.0, forces=np.ones((len(a), 3)),
                          level_of_theory="PBE/def2-SVP", mol_id="methanol", source="made-up",
                          info={"frame": i}) for i, a in enumerate(atoms)]
    new = L.relabel_xtb(other, file="made-up frames")
    assert len(new) == len(other)
    for a, old, rec in zip(atoms, other, new):
        np.testing.assert_array_equal(rec.pos, old.pos)
        np.testing.assert_array_equal(rec.z, old.z)
        e_ref, f_ref = _fresh(a)
        assert rec.energy == pytest.approx(e_ref, abs=1e-6)
        np.testing.assert_allclose(rec.forces, f_ref, atol=1e-6)
        assert rec.level_of_theory == "GFN2-xTB" and rec.info["relabelled_from"] == "PBE/def2-SVP"
        assert (rec.mol_id, rec.source, rec.info["frame"]) == ("methanol", "made-up", old.info["frame"])
        assert old.energy == -1.0 and np.all(old.forces == 1.0)  # the input records are not changed


def _hydroxyl_torsion(m) -> float:
    """|H-O-C-C| of ethanol (degrees): about 60 for gauche, 180 for trans."""
    o = int(np.where(m.numbers == 8)[0][0])
    h = min((i for i in range(len(m)) if m.numbers[i] == 1), key=lambda i: m.get_distance(o, i))
    c1 = min((i for i in range(len(m)) if m.numbers[i] == 6), key=lambda i: m.get_distance(o, i))
    c2 = max((i for i in range(len(m)) if m.numbers[i] == 6), key=lambda i: m.get_distance(o, i))
    x = m.get_dihedral(h, o, c1, c2)
    return min(x, 360 - x)


def test_rank_conformers_puts_each_mmff_minimum_first():
    """ETKDG draws ethanol's gauche rotamer far more often than trans; ranking the MMFF-optimized
    draws gives one of each distinct minimum (lowest MMFF energy first), and the repeats."""
    confs = L.embed("CCO", 30, seed=5, name="ethanol")
    assert all(isinstance(c.info["mmff_energy"], float) for c in confs)
    distinct, repeats = L.rank_conformers(confs)
    ranked = distinct + repeats
    assert len(distinct) == 2 and {id(c) for c in ranked} == {id(c) for c in confs} and len(ranked) == len(confs)
    torsions = [_hydroxyl_torsion(c) for c in ranked]
    # MMFF94 has exactly two distinct minima (the two gauche are mirror images: same distances)
    assert sorted(torsions[:2]) == [pytest.approx(60, abs=15), pytest.approx(180, abs=5)]
    energies = [c.info["mmff_energy"] for c in ranked]
    assert energies[0] < energies[1] and energies[2:] == sorted(energies[2:])
    assert not L._same_geometry(ranked[0], ranked[1], energies[0], energies[1])
    assert all(any(L._same_geometry(r, d, r.info["mmff_energy"], d.info["mmff_energy"]) for d in ranked[:2])
               for r in ranked[2:])
    with pytest.raises(ValueError, match="no MMFF energy"):
        L.rank_conformers(L.embed("CCO", 2, seed=5, mmff=False))
    with pytest.raises(ValueError, match="needs mmff=True"):
        L.label_molecule("ethanol", "CCO", n_screen=10, mmff=False)


def test_screen_optimizes_each_mmff_minimum_once_and_falls_back_on_failures(monkeypatch):
    """A rigid molecule has one MMFF minimum: the screen optimizes it once where embedding order
    optimizes all n_embed conformers; the repeats are tried only when the distinct minima all
    fail (here the first optimization is made to fail)."""
    real = L.optimize_minimum
    calls = []

    def counted(atoms, *args, **kwargs):
        calls.append(atoms)
        if fail_first and len(calls) == 1:
            raise DataError("made to fail")
        return real(atoms, *args, **kwargs)

    monkeypatch.setattr(L, "optimize_minimum", counted)
    fail_first = False
    plain = L.label_molecule("water", "O", n_conformers=3, md_frames_per_T=0, n_normal_mode=0)
    assert len(plain) == 1 and len(calls) == 9
    calls.clear()
    screened = L.label_molecule("water", "O", n_conformers=3, n_screen=20, md_frames_per_T=0, n_normal_mode=0)
    assert len(screened) == 1 and len(calls) == 1
    calls.clear()
    fail_first = True
    rescued = L.label_molecule("water", "O", n_conformers=3, n_screen=20, md_frames_per_T=0, n_normal_mode=0)
    assert len(rescued) == 1 and len(calls) == 2 and calls[1] is not calls[0]
    assert rescued[0].get_potential_energy() == pytest.approx(screened[0].get_potential_energy(), abs=1e-4)


def test_label_screen_reaches_both_ethanol_rotamers(tmp_path):
    """``forcecentric label`` screens 50 MMFF conformers by default: two optimizations find both of
    ethanol's minima, gauche (|H-O-C-C| about 60 degrees) and trans (180), which GFN2-xTB puts
    67 meV apart. ``--screen 0 --embed 30`` (embedding order) also reaches both, with more
    optimizations."""
    import json

    from forcecentric.cli import main
    from forcecentric.data import read_all

    smi = tmp_path / "ethanol.smi"
    smi.write_text("CCO ethanol\n")
    for out, extra in ((tmp_path / "screened", ["--conformers", "2"]),
                       (tmp_path / "embed30", ["--conformers", "3", "--screen", "0", "--embed", "30"])):
        assert main(["label", str(smi), "--out", str(out), *extra, "--md-frames", "0", "--nm-samples", "0",
                     "--workers", "1", "--no-progress"]) == 0
        minima = [r.to_atoms() for r in read_all(out / "shard-00000.extxyz")]
        assert len(minima) == 2 and all(m.info["equilibrium"] for m in minima)
        angles = [_hydroxyl_torsion(m) for m in minima]
        assert sorted(angles) == [pytest.approx(56, abs=10), pytest.approx(180, abs=5)]
        energies = {round(a): m.get_potential_energy() for a, m in zip(angles, minima)}
        gap = energies[max(energies)] - energies[min(energies)]
        assert 0.03 < gap < 0.1  # GFN2-xTB's trans - gauche, eV
    assert json.loads((tmp_path / "screened" / "label_settings.json").read_text())["settings"]["n_screen"] == 50
    settings = json.loads((tmp_path / "embed30" / "label_settings.json").read_text())["settings"]
    assert (settings["n_embed"], settings["n_screen"]) == (30, 0)


def test_non_finite_labels_are_refused_naming_file_and_record():
    from forcecentric.data.dft import check_finite_labels

    forces = np.zeros((3, 3))
    check_finite_labels(-1.5, forces, "unused")  # finite: no error
    with pytest.raises(DataError, match=r"file 'a\.xyz', record 7: xTB gave NaN"):
        check_finite_labels(float("nan"), forces, "xTB gave NaN", file="a.xyz", record=7)
    forces[2, 1] = -np.inf
    with pytest.raises(DataError, match="record 0: bad force"):
        check_finite_labels(0.0, forces, "bad force", record=0)
