"""GFN2-xTB molecular-property labels (HOMO, LUMO, gap, dipole) and the bundled property set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule

import forcecentric
from forcecentric.data import Conformation, read_all
from forcecentric.data import label as L
from forcecentric.errors import DataError

pytest.importorskip("tblite")

BUNDLED = Path(forcecentric.__file__).parent / "bundled" / "xtb_properties.extxyz"
PROPS = ("homo", "lumo", "gap", "mu", "dipole_x", "dipole_y", "dipole_z")


def _rotation(seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_water_values_and_units():
    water = molecule("H2O")
    p = L.xtb_properties(water)
    assert p["homo"] < p["lumo"]
    assert p["gap"] == pytest.approx(p["lumo"] - p["homo"], abs=1e-12)
    # GFN2-xTB water dipole is ~0.90 e·Bohr = ~2.29 D
    assert p["mu"] == pytest.approx(2.29, abs=0.03)
    assert p["mu"] == pytest.approx(np.linalg.norm(p["dipole"]), rel=1e-12)
    # same conversion done by hand from tblite's raw result (e·Bohr, Hartree)
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", water.numbers, water.positions / units.Bohr)
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    d_au = np.asarray(res.get("dipole"))
    assert np.linalg.norm(d_au) == pytest.approx(0.90, abs=0.01)
    assert p["mu"] == pytest.approx(np.linalg.norm(d_au) * units.Bohr / units.Debye, rel=1e-6)
    # energy in eV, the same as the ASE calculator that made every other label
    ref = water.copy()
    ref.calc = L.xtb_calculator()
    assert p["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    assert p["energy"] == pytest.approx(float(res.get("energy")) * units.Hartree, abs=1e-6)
    # 8 valence electrons: HOMO is orbital 3 (0-based)
    eps = np.asarray(res.get("orbital-energies")) * units.Hartree
    assert p["n_electrons"] == 8
    assert p["homo"] == pytest.approx(eps[3], abs=1e-8) and p["lumo"] == pytest.approx(eps[4], abs=1e-8)
    assert np.all(np.isfinite(p["charges"])) and p["charges"].sum() == pytest.approx(0.0, abs=1e-6)


def test_dipole_rotates_with_the_molecule():
    mol = molecule("H2CO")
    p0 = L.xtb_properties(mol)
    assert p0["homo"] < p0["lumo"] and p0["mu"] > 1.0
    rot = _rotation(3)
    turned = mol.copy()
    turned.positions = mol.positions @ rot.T + np.array([1.5, -2.0, 0.7])
    p1 = L.xtb_properties(turned)
    np.testing.assert_allclose(p1["dipole"], rot @ p0["dipole"], atol=1e-5)
    assert p1["mu"] == pytest.approx(p0["mu"], abs=1e-6)
    for key in ("homo", "lumo", "gap", "energy"):
        assert p1[key] == pytest.approx(p0[key], abs=1e-6), key


def test_open_shell_molecules_are_refused():
    with pytest.raises(DataError, match=r"CH3.*odd-electron"):
        L.xtb_properties(molecule("CH3"))
    # even electron count but degenerate half-filled frontier orbitals (triplet O2)
    o2 = Atoms("O2", positions=[[0, 0, 0], [0, 0, 1.21]])
    o2.info["mol_id"] = "dioxygen"
    with pytest.raises(DataError, match=r"dioxygen.*frontier"):
        L.xtb_properties(o2)
    # a cation of an odd-electron neutral is closed shell again
    assert L.xtb_properties(molecule("CH3"), charge=1)["gap"] > 0


def test_non_finite_positions_are_refused():
    bad = molecule("H2O")
    bad.positions[0, 0] = np.nan
    bad.info["mol_id"] = "wet"
    with pytest.raises(DataError, match="wet"):
        L.xtb_properties(bad)


def test_label_properties_records_and_round_trip(tmp_path):
    water = molecule("H2O")
    water.info.update(mol_id="water", smiles="O")
    conf = Conformation(
        z=molecule("NH3").numbers, pos=molecule("NH3").positions, mol_id="ammonia",
        equilibrium=True, source="somewhere", info={"smiles": "N"},
    )
    failures: list = []
    out = L.label_properties([water, molecule("CH3"), conf], workers=1, failures=failures)
    assert [a.info["mol_id"] for a in out] == ["water", "ammonia"]
    assert failures and failures[0][:2] == (1, "CH3")
    for a in out:
        for key in L.PROPERTY_INFO_KEYS:
            assert key in a.info, key
        for key in PROPS:
            assert isinstance(a.info[key], float), key
        assert a.info["equilibrium"] is True and a.info["level_of_theory"] == "GFN2-xTB"
        assert a.info["charge"] == 0
        assert a.info["gap"] == pytest.approx(a.info["lumo"] - a.info["homo"])
        assert a.calc is not None and "forces" not in a.calc.results
    assert out[0].info["source"] == L.DEFAULT_SOURCE and out[1].info["source"] == "somewhere"
    assert out[0].info["mu"] == pytest.approx(2.29, abs=0.03)
    assert out[0].get_potential_energy() == pytest.approx(L.xtb_properties(water)["energy"])
    # without a failures list the first failure raises, naming record and molecule
    with pytest.raises(DataError, match=r"record 1.*CH3"):
        L.label_properties([water, molecule("CH3")], workers=1)

    # property records have no forces: the default writer refuses them, require_forces=False not
    with pytest.raises(DataError, match=r"record 0: record has no energy/forces"):
        L.write_extxyz(tmp_path / "p.extxyz", out)
    assert not list(tmp_path.iterdir())
    path = L.write_extxyz(tmp_path / "p.extxyz", out, require_forces=False)
    back = read_all(path)
    assert [c.mol_id for c in back] == ["water", "ammonia"]
    for a, c in zip(out, back):
        assert c.equilibrium is True and c.forces is None
        assert c.energy == pytest.approx(a.get_potential_energy(), abs=1e-8)
        assert c.info["smiles"] == a.info["smiles"]
        for key in PROPS:
            assert isinstance(c.info[key], float) and c.info[key] == pytest.approx(a.info[key], abs=1e-10)


def test_label_properties_in_worker_processes_matches_one_process():
    """workers=2 runs the same calculations in spawned processes (the pool terminates them if the
    caller is killed) and returns the same records, in order, with the failure in its place."""
    water, ammonia = molecule("H2O"), molecule("NH3")
    water.info["mol_id"], ammonia.info["mol_id"] = "water", "ammonia"
    records = [water, molecule("CH3"), ammonia]
    one, two = [], []
    serial = L.label_properties(records, workers=1, failures=one)
    parallel = L.label_properties(records, workers=2, failures=two)
    assert [a.info["mol_id"] for a in parallel] == ["water", "ammonia"]
    assert [f[:2] for f in two] == [f[:2] for f in one] == [(1, "CH3")]
    for a, b in zip(serial, parallel):
        for key in PROPS:
            assert b.info[key] == pytest.approx(a.info[key], abs=1e-8), key


@pytest.mark.skipif(not BUNDLED.is_file(), reason="bundled property set not built")
def test_bundled_property_set_reads_back():
    records = read_all(BUNDLED)
    assert len(records) > 1000
    assert len({c.mol_id for c in records}) == len(records)
    for c in records:
        assert c.equilibrium and c.forces is None and c.energy is not None
        assert c.source == "forcecentric-xtb-properties" and c.level_of_theory == "GFN2-xTB"
        for key in PROPS:
            assert isinstance(c.info[key], float) and np.isfinite(c.info[key]), (c.mol_id, key)
        assert c.info["gap"] > 0 and c.info["gap"] == pytest.approx(c.info["lumo"] - c.info["homo"])
        d = np.array([c.info["dipole_x"], c.info["dipole_y"], c.info["dipole_z"]])
        assert c.info["mu"] == pytest.approx(np.linalg.norm(d), abs=1e-8)
        assert isinstance(c.info["smiles"], str) and c.info["smiles"]
