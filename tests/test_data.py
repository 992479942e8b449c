"""Conformation validation and the ASE-format reader."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from forcecentric.data import Conformation, read, read_all
from forcecentric.data.dataset import Batch, collate
from forcecentric.data.splits import molecule_split, random_split
from forcecentric.errors import DataError


def _conf(**kw):
    base = dict(z=[8, 1, 1], pos=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]],
                energy=-10.0, forces=np.zeros((3, 3)))
    base.update(kw)
    return Conformation(**base)


def test_valid_conformation_passes():
    c = _conf().validate(file="x.xyz", record=3)
    assert c.n_atoms == 3 and c.pos.dtype == np.float64


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(pos=[[0, 0, np.nan], [1, 0, 0], [0, 1, 0]]), "NaN or Inf"),
        (dict(forces=np.full((3, 3), np.inf)), "forces contain NaN or Inf"),
        (dict(energy=float("nan")), "energy is nan"),
        (dict(forces=np.zeros((2, 3))), "forces have shape (2, 3)"),
        (dict(pos=[[0, 0, 0], [0.05, 0, 0], [0, 1, 0]]), "closer than 0.1"),
        (dict(z=[], pos=np.zeros((0, 3)), forces=None), "no atoms"),
        (dict(pos=[[0, 0, 0], [1, 0, 0]]), "positions have shape (2, 3)"),
    ],
)
def test_bad_conformations_name_file_record_and_problem(kw, message):
    with pytest.raises(DataError) as info:
        _conf(**kw).validate(file="data.extxyz", record=7)
    text = str(info.value)
    assert "data.extxyz" in text and "record 7" in text and message in text


def test_force_bound():
    with pytest.raises(DataError, match="exceeds the bound"):
        _conf(forces=np.full((3, 3), 50.0)).validate(max_force=20.0)


def test_extxyz_roundtrip_and_flags(tmp_path):
    a = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    f = np.arange(9.0).reshape(3, 3) / 10
    a.calc = SinglePointCalculator(a, energy=-12.5, forces=f)
    a.info.update(equilibrium=True, mol_id="water", level_of_theory="GFN2-xTB")
    path = tmp_path / "w.extxyz"
    ase.io.write(path, [a, a], format="extxyz")
    recs = read_all(path)
    assert len(recs) == 2
    r = recs[0]
    assert r.energy == pytest.approx(-12.5)
    np.testing.assert_allclose(r.forces, f)
    assert r.equilibrium is True and r.mol_id == "water" and r.level_of_theory == "GFN2-xTB"


def test_custom_keys_and_units(tmp_path):
    a = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    a.info["REF_energy"] = -1.0  # kcal/mol
    a.arrays["REF_forces"] = np.ones((3, 3))
    path = tmp_path / "k.extxyz"
    ase.io.write(path, a, format="extxyz")
    import ase.units as u

    (r,) = read(path, energy_key="REF_energy", forces_key="REF_forces", energy_unit="kcal/mol")
    assert r.energy == pytest.approx(-1.0 * u.kcal / u.mol)
    assert r.energy == pytest.approx(-0.0433641, rel=1e-5)
    np.testing.assert_allclose(r.forces, np.ones((3, 3)) * u.kcal / u.mol)
    with pytest.raises(DataError, match="unknown unit"):
        list(read(path, energy_unit="kcal/mole"))


def test_bad_record_in_file_is_named(tmp_path):
    good = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    bad = Atoms("OH2", positions=[[0, 0, 0], [0.01, 0, 0], [-0.24, 0.93, 0]])
    path = tmp_path / "bad.extxyz"
    ase.io.write(path, [good, good, bad], format="extxyz")
    with pytest.raises(DataError, match=r"bad\.extxyz.*record 2.*closer than"):
        read_all(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_all(tmp_path / "nope.extxyz")
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_all(empty)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("3\nnot a comment line = \"\nX 1 2\n")
    with pytest.raises(DataError, match="garbage.extxyz"):
        read_all(garbage)


def test_collate_and_select():
    recs = [_conf(), _conf(z=[6, 1, 1, 1, 1], pos=np.eye(5, 3) * 1.1 + np.arange(5)[:, None] * 0.3,
                           energy=None, forces=None, equilibrium=True)]
    b = collate(recs)
    assert b.z.shape == (8,) and b.batch.tolist() == [0] * 3 + [1] * 5
    assert b.has_energy.tolist() == [True, False] and b.has_forces.tolist() == [True, False]
    assert np.isnan(b.energy[1].item())
    sub = b.select(b.equilibrium)
    assert sub.n_graphs == 1 and sub.z.tolist() == [6, 1, 1, 1, 1] and sub.batch.tolist() == [0] * 5
    both = Batch.concat([b, sub])
    assert both.n_graphs == 3 and both.batch.max().item() == 2


def test_splits_are_disjoint_and_stable():
    a = random_split(100, [10, 20, None], seed=1)
    assert [len(x) for x in a] == [10, 20, 70]
    assert len(set(np.concatenate(a))) == 100
    # val/test drawn first do not change when the train size changes
    b = random_split(100, [10, 20, 30, None], seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    ids = [f"m{i % 7}" for i in range(70)]
    parts = molecule_split(ids, [2, 1, None], seed=0)
    sets = [{ids[i] for i in p} for p in parts]
    assert len(sets[0]) == 2 and len(sets[1]) == 1 and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    with pytest.raises(DataError):
        random_split(5, [10, None])
