"""Readers of the public formats: each test writes a small file in the source's real layout."""

from __future__ import annotations

import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from forcecentric.data import read, read_all
from forcecentric.data.sources import READERS, guess_format
from forcecentric.data.sources.qm9 import QM9_UNITS
from forcecentric.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

HARTREE = 27.211386  # eV
KCAL = 0.0433641  # eV per kcal/mol
BOHR = 0.52917721  # Angstrom

WATER = np.array([[0.0, 0.0, 0.117], [0.0, 0.757, -0.469], [0.0, -0.757, -0.469]])
ETHANOL_Z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
ETHANOL_R = np.array([
    [0.0072, -0.5687, 0.0], [-1.2854, 0.2499, 0.0], [1.1304, 0.3147, 0.0],
    [0.0392, -1.1972, 0.89], [0.0392, -1.1972, -0.89], [-1.3175, 0.8784, 0.89],
    [-1.3175, 0.8784, -0.89], [-2.1422, -0.4239, 0.0], [1.9857, -0.1365, 0.0],
])


def _frames(n=3, seed=0):
    rng = np.random.default_rng(seed)
    R = ETHANOL_R[None] + rng.normal(scale=0.02, size=(n, 9, 3))
    E = -97208.4 + rng.normal(size=n)
    F = rng.normal(scale=20.0, size=(n, 9, 3))
    return R, E, F


# ------------------------------------------------------------------------------------- MD17


def test_md17_original_npz(tmp_path):
    R, E, F = _frames()
    path = tmp_path / "md17_ethanol.npz"
    np.savez(path, z=ETHANOL_Z, R=R, E=E[:, None], F=F, name=np.array("ethanol"),
             theory=np.array("DFT: PBE+TS"), type=np.array("d"), md5=np.array("x"))
    assert guess_format(path) == "md17"
    recs = read_all(path)
    assert len(recs) == 3
    r = recs[1]
    assert r.energy == pytest.approx(E[1] * KCAL, rel=1e-6)
    np.testing.assert_allclose(r.forces, F[1] * KCAL, rtol=1e-6)
    np.testing.assert_allclose(r.pos, R[1])
    assert r.z.tolist() == ETHANOL_Z.tolist()
    assert (r.source, r.mol_id, r.level_of_theory, r.equilibrium) == ("MD17", "ethanol", "DFT: PBE+TS", False)


def test_rmd17_npz(tmp_path):
    R, E, F = _frames(seed=1)
    path = tmp_path / "rmd17_ethanol.npz"
    np.savez(path, nuclear_charges=ETHANOL_Z, coords=R, energies=E, forces=F,
             old_indices=np.array([10, 20, 30]), old_energies=E, old_forces=F)
    assert guess_format(path) == "rmd17"
    recs = list(read(path))
    assert [r.info["md17_index"] for r in recs] == [10, 20, 30]
    assert recs[2].energy == pytest.approx(E[2] * KCAL, rel=1e-6)
    np.testing.assert_allclose(recs[2].forces, F[2] * KCAL, rtol=1e-6)
    assert (recs[0].source, recs[0].mol_id, recs[0].level_of_theory) == ("rMD17", "ethanol", "PBE/def2-SVP")


def test_md22_npz_and_sgdml_units(tmp_path):
    R, E, F = _frames(seed=2)
    path = tmp_path / "md22_Ac-Ala3-NHMe.npz"
    np.savez(path, z=ETHANOL_Z, R=R, E=E[:, None], F=F, name=np.array("Ac-Ala3-NHMe"))
    assert guess_format(path) == "md22"
    r = read_all(path)[0]
    assert (r.source, r.mol_id, r.level_of_theory) == ("MD22", "Ac-Ala3-NHMe", "PBE+MBD")
    assert r.energy == pytest.approx(E[0] * KCAL, rel=1e-6)
    # newer sGDML files record their units; they win over the kcal/mol default
    path2 = tmp_path / "other.npz"
    np.savez(path2, z=ETHANOL_Z, R=R, E=E[:, None] / 23.0605, F=F, e_unit=np.array("eV"), r_unit=np.array("Ang"))
    assert read_all(path2)[0].energy == pytest.approx(E[0] / 23.0605, rel=1e-9)


def test_md17_plain_xyz(tmp_path):
    path = tmp_path / "ethanol.xyz"
    lines = []
    for k in range(2):
        lines += ["9", f"{-97208.40600498248 + k}"]
        lines += [f"{s} {x} {y} {z} 1.5 -2.0 {k}" for s, (x, y, z) in zip("CCOHHHHHH", ETHANOL_R)]
    path.write_text("\n".join(lines) + "\n")
    assert guess_format(path) == "md17"
    recs = read_all(path)
    assert len(recs) == 2
    assert recs[1].energy == pytest.approx((-97208.40600498248 + 1) * KCAL, rel=1e-6)
    np.testing.assert_allclose(recs[0].forces[0], np.array([1.5, -2.0, 0.0]) * KCAL, rtol=1e-5)


def test_npz_missing_key_names_file_and_key(tmp_path):
    R, E, F = _frames()
    path = tmp_path / "broken.npz"
    np.savez(path, z=ETHANOL_Z, R=R, E=E[:, None])  # no F
    with pytest.raises(DataError, match=r"broken\.npz.*'F'"):
        list(read(path, format="md17"))
    with pytest.raises(DataError, match=r"broken\.npz"):
        guess_format(path)


def test_npz_shape_mismatch(tmp_path):
    R, E, F = _frames()
    path = tmp_path / "shapes.npz"
    np.savez(path, z=ETHANOL_Z, R=R, E=E[:, None], F=F[:, :8])
    with pytest.raises(DataError, match=r"shapes\.npz.*forces have shape \(3, 8, 3\)"):
        read_all(path)


# ------------------------------------------------------------------------------------ ANI-1x


def _write_ani1x(path):
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        g = f.create_group("H2O1")
        g["atomic_numbers"] = np.array([8, 1, 1], dtype=np.uint8)
        g["coordinates"] = (WATER[None] + rng.normal(scale=0.01, size=(3, 3, 3))).astype(np.float32)
        g["wb97x_dz.energy"] = np.array([-76.38, -76.37, np.nan])
        forces = rng.normal(scale=0.02, size=(3, 3, 3)).astype(np.float32)
        forces[1] = np.nan
        g["wb97x_dz.forces"] = forces
        g["ccsd(t)_cbs.energy"] = np.array([-76.30, np.nan, np.nan])
        g["hf_dz.energy"] = np.array([-76.0, -76.01, -76.02])
        g["wb97x_dz.dipole"] = np.zeros((3, 3), dtype=np.float32)
        g2 = f.create_group("C1H4")
        g2["atomic_numbers"] = np.array([6, 1, 1, 1, 1], dtype=np.uint8)
        ch4 = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
        g2["coordinates"] = ch4[None].astype(np.float32)
        g2["wb97x_dz.energy"] = np.array([-40.5])
        g2["wb97x_dz.forces"] = np.zeros((1, 5, 3), dtype=np.float32)
        g2["ccsd(t)_cbs.energy"] = np.array([-40.45])
    return forces


def test_ani1x_units_and_missing_values(tmp_path):
    path = tmp_path / "ani1x-release.h5"
    forces = _write_ani1x(path)
    assert guess_format(path) == "ani1x"
    recs = read_all(path)  # wb97x_dz; conformer 2 has no energy -> skipped; conformer 1 kept without forces
    by = {(r.info["group"], r.info["conformer"]): r for r in recs}
    assert sorted(by) == [("C1H4", 0), ("H2O1", 0), ("H2O1", 1)]
    r = by[("H2O1", 0)]
    assert r.energy == pytest.approx(-76.38 * HARTREE, rel=1e-7)
    np.testing.assert_allclose(r.forces, forces[0].astype(np.float64) * HARTREE, rtol=1e-6)
    assert r.info["ccsd(t)_cbs.energy"] == pytest.approx(-76.30 * HARTREE, rel=1e-7)
    assert by[("H2O1", 1)].forces is None and "ccsd(t)_cbs.energy" not in by[("H2O1", 1)].info
    assert (r.source, r.level_of_theory, r.mol_id, r.equilibrium) == ("ANI-1x", "wB97X/6-31G(d)", "H2O1", False)
    assert len(read_all(path, missing_forces="drop")) == 2
    cc = read_all(path, level="ccsd(t)_cbs")
    assert len(cc) == 2 and all(c.forces is None for c in cc)
    assert cc[0].level_of_theory == "CCSD(T)*/CBS"
    with pytest.raises(DataError, match="no conformations"):
        read_all(path, level="ccsd(t)_cbs", missing_forces="drop")


def test_ani1_old_layout(tmp_path):
    path = tmp_path / "ani_gdb_s01.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("gdb11_s01").create_group("gdb11_s01-0")
        g["coordinates"] = np.stack([WATER, WATER * 1.01]).astype(np.float32)
        g["energies"] = np.array([-76.4, -76.39])
        g["species"] = np.array([b"O", b"H", b"H"])
        g["smiles"] = np.array([b"O"])
    assert guess_format(path) == "ani1x"
    recs = read_all(path)
    assert len(recs) == 2 and recs[0].z.tolist() == [8, 1, 1]
    assert recs[1].energy == pytest.approx(-76.39 * HARTREE, rel=1e-7) and recs[1].forces is None
    assert (recs[0].source, recs[0].mol_id, recs[0].info["smiles"]) == ("ANI-1", "gdb11_s01-0", "O")


def test_ani1x_mismatched_group_is_named(tmp_path):
    path = tmp_path / "bad_ani.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("C1H4")
        g["atomic_numbers"] = np.array([6, 1, 1, 1], dtype=np.uint8)
        g["coordinates"] = np.zeros((2, 5, 3), dtype=np.float32)
        g["wb97x_dz.energy"] = np.zeros(2)
    with pytest.raises(DataError, match=r"bad_ani\.h5.*group 'C1H4'.*4 atoms"):
        read_all(path)


# ------------------------------------------------------------------------------------- SPICE


def _write_spice(path, *, bad_gradient=False, nan_conformer=False):
    rng = np.random.default_rng(4)
    nh4 = np.array([[0, 0, 0], [0.59, 0.59, 0.59], [-0.59, -0.59, 0.59], [-0.59, 0.59, -0.59], [0.59, -0.59, -0.59]])
    with h5py.File(path, "w") as f:
        g = f.create_group("[NH4+]")
        g["atomic_numbers"] = np.array([7, 1, 1, 1, 1], dtype=np.int16)
        conf = (nh4[None] + rng.normal(scale=0.01, size=(2, 5, 3))) / BOHR  # stored in bohr
        if nan_conformer:
            conf[1, 0, 0] = np.nan
        g.create_dataset("conformations", data=conf.astype(np.float32)).attrs["units"] = "bohr"
        g.create_dataset("dft_total_energy", data=np.array([-56.9, -56.8])).attrs["units"] = "hartree"
        grad = rng.normal(scale=0.01, size=(2, 4 if bad_gradient else 5, 3)).astype(np.float32)
        g.create_dataset("dft_total_gradient", data=grad).attrs["units"] = "hartree/bohr"
        g.create_dataset("formation_energy", data=np.array([-0.5, -0.49])).attrs["units"] = "hartree"
        g["mbis_charges"] = rng.normal(size=(2, 5, 1)).astype(np.float32)
        g["smiles"] = np.array([b"[H:2][N+:1]([H:3])([H:4])[H:5]"], dtype=object)
        g["subset"] = np.array([b"SPICE PubChem Set 1 Single Points Dataset v1.2"], dtype=object)
        w = f.create_group("water")  # no unit attributes: the documented units apply
        w["atomic_numbers"] = np.array([8, 1, 1], dtype=np.int16)
        w["conformations"] = (WATER[None] / BOHR).astype(np.float32)
        w["dft_total_energy"] = np.array([-76.4])
        w["dft_total_gradient"] = np.full((1, 3, 3), 0.01, dtype=np.float32)
        w["smiles"] = np.array([b"[H:2][O:1][H:3]"], dtype=object)
        w["subset"] = np.array([b"SPICE Water Clusters v1.0"], dtype=object)
    return conf, grad


def test_spice_units_gradient_sign_and_charge(tmp_path):
    path = tmp_path / "SPICE-1.1.4.hdf5"
    conf, grad = _write_spice(path)
    assert guess_format(path) == "spice"
    recs = read_all(path)
    assert len(recs) == 3
    r = recs[1]
    assert (r.mol_id, r.info["group"], r.info["conformer"], r.charge) == ("[NH4+]", "[NH4+]", 1, 1)
    np.testing.assert_allclose(r.pos, conf[1].astype(np.float32).astype(np.float64) * BOHR, rtol=1e-6)
    assert r.energy == pytest.approx(-56.8 * HARTREE, rel=1e-7)
    np.testing.assert_allclose(r.forces, -grad[1].astype(np.float64) * HARTREE / BOHR, rtol=1e-6)
    assert r.info["formation_energy"] == pytest.approx(-0.49 * HARTREE, rel=1e-7)
    assert r.info["mbis_charges"].shape == (5,)
    assert (r.source, r.level_of_theory, r.equilibrium) == ("SPICE", "wB97M-D3(BJ)/def2-TZVPPD", False)
    w = recs[2]
    assert w.charge == 0 and w.forces[0, 0] == pytest.approx(-0.01 * HARTREE / BOHR, rel=1e-6)
    np.testing.assert_allclose(w.pos, WATER, atol=1e-6)
    assert len(read_all(path, subsets=["water"])) == 1


def test_spice_mismatched_shapes_name_file_and_group(tmp_path):
    path = tmp_path / "bad_spice.hdf5"
    _write_spice(path, bad_gradient=True)
    with pytest.raises(DataError, match=r"bad_spice\.hdf5.*record 0.*group '\[NH4\+\]'.*dft_total_gradient"):
        read_all(path)


def test_hdf5_invalid_conformer_names_group_and_conformer(tmp_path):
    path = tmp_path / "nan_spice.hdf5"
    _write_spice(path, nan_conformer=True)
    with pytest.raises(DataError, match=r"nan_spice\.hdf5.*record 1.*group '\[NH4\+\]' conformer 1.*NaN"):
        read_all(path)
    assert len(read_all(path, validate=False)) == 3


# --------------------------------------------------------------------------------- PCQM4Mv2


def _sdf_block(title, atoms, coords, bonds, charges=()):
    lines = [title, "     RDKit          3D", ""]
    lines.append(f"{len(atoms):3d}{len(bonds):3d}  0  0  0  0  0  0  0  0999 V2000")
    for s, (x, y, z) in zip(atoms, coords):
        lines.append(f"{x:10.4f}{y:10.4f}{z:10.4f} {s:<3} 0  0  0  0  0  0  0  0  0  0  0  0")
    for a, b, o in bonds:
        lines.append(f"{a:3d}{b:3d}{o:3d}  0")
    for idx, ch in charges:
        lines.append(f"M  CHG  1 {idx:3d} {ch:3d}")
    lines.append("M  END")
    return "\n".join(lines) + "\n"


WATER_BLOCK = ("O", "H", "H"), WATER, [(1, 2, 1), (1, 3, 1)]
# a 5-bonded carbon: RDKit cannot sanitize it
CH5_COORDS = np.array([[0, 0, 0], [1.09, 0, 0], [-1.09, 0, 0], [0, 1.09, 0], [0, -1.09, 0], [0, 0, 1.09]])


def test_pcqm4mv2_sdf(tmp_path):
    path = tmp_path / "pcqm4m-v2-train.sdf"
    nh4 = np.array([[0, 0, 0], [0.59, 0.59, 0.59], [-0.59, -0.59, 0.59], [-0.59, 0.59, -0.59], [0.59, -0.59, -0.59]])
    text = _sdf_block("", *WATER_BLOCK) + "$$$$\n"
    text += _sdf_block("", ("N", "H", "H", "H", "H"), nh4, [(1, k, 1) for k in range(2, 6)], charges=[(1, 1)]) + "$$$$\n"
    text += _sdf_block("", ("C",) + ("H",) * 5, CH5_COORDS, [(1, k, 1) for k in range(2, 7)]) + "$$$$\n"  # unsanitizable
    path.write_text(text)
    assert guess_format(path) == "pcqm4mv2"
    recs = read_all(path)
    assert [r.mol_id for r in recs] == ["0", "1", "2"]
    assert all(r.equilibrium and r.energy is None and r.forces is None for r in recs)
    np.testing.assert_allclose(recs[0].pos, WATER, atol=1e-4)
    assert recs[1].z.tolist() == [7, 1, 1, 1, 1] and recs[1].charge == 1
    assert recs[2].n_atoms == 6  # pentavalent carbon: kept (no sanitization)
    assert (recs[0].source, recs[0].level_of_theory) == ("PCQM4Mv2", "B3LYP/6-31G*")


def test_sdf_broken_molblock_is_reported(tmp_path):
    path = tmp_path / "pcqm4m-v2-train.sdf"
    broken = "\n     RDKit          3D\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\n  garbage\nM  END\n"
    path.write_text(_sdf_block("", *WATER_BLOCK) + "$$$$\n" + broken + "$$$$\n" + _sdf_block("", *WATER_BLOCK) + "$$$$\n")
    with pytest.raises(DataError, match=r"pcqm4m-v2-train\.sdf.*record 1"):
        read_all(path)
    recs = read_all(path, errors="skip")
    assert [r.mol_id for r in recs] == ["0", "2"]


# -------------------------------------------------------------------------------------- QM9

QM9_CH4 = """5
gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""

QM9_H2O = """3
gdb 3\t799.58812\t437.90386\t282.94545\t1.8511\t6.31\t-0.2928\t0.0687\t0.3615\t19.0002\t0.021375\t-76.404702\t-76.401867\t-76.400922\t-76.422349\t6.002\t
O\t-0.0343604951\t 0.9775395708\t 0.0076015923\t-0.589706
H\t 0.0647664923\t 0.0205721989\t 2.1504*^-6\t 0.294853
H\t 0.8717598718\t 1.3007924048\t 1.2345*^-5\t 0.294853
1591.1439\t3657.3467\t3761.6547
O\tO\t
InChI=1S/H2O/h1H2\tInChI=1S/H2O/h1H2
"""


def _check_ch4(r):
    assert r.mol_id == "gdb_1" and r.equilibrium and r.forces is None
    assert r.energy == pytest.approx(-40.47893 * HARTREE, rel=1e-7)
    assert r.info["U0"] == r.energy
    assert r.info["homo"] == pytest.approx(-0.3877 * HARTREE, rel=1e-7)
    assert r.info["gap"] == pytest.approx(0.5048 * HARTREE, rel=1e-7)
    assert r.info["zpve"] == pytest.approx(0.044749 * HARTREE, rel=1e-7)
    assert r.info["G"] == pytest.approx(-40.498597 * HARTREE, rel=1e-7)
    assert (r.info["mu"], r.info["alpha"], r.info["r2"], r.info["Cv"], r.info["A"]) == (0.0, 13.21, 35.3641, 6.469, 157.7118)
    assert (r.source, r.level_of_theory) == ("QM9", "B3LYP/6-31G(2df,p)")


def test_qm9_original_xyz_file_directory_and_tar(tmp_path):
    d = tmp_path / "dsgdb9nsd"
    d.mkdir()
    (d / "dsgdb9nsd_000001.xyz").write_text(QM9_CH4)
    (d / "dsgdb9nsd_000003.xyz").write_text(QM9_H2O)
    assert guess_format(d / "dsgdb9nsd_000003.xyz") == "qm9"
    (w,) = read_all(d / "dsgdb9nsd_000003.xyz")
    assert w.pos[1, 2] == pytest.approx(2.1504e-6) and w.pos[2, 2] == pytest.approx(1.2345e-5)
    assert w.info["mulliken_charges"].tolist() == [-0.589706, 0.294853, 0.294853]
    assert w.info["frequencies"].shape == (3,) and w.info["smiles"] == "O" and w.info["index"] == 3
    assert w.info["mu"] == 1.8511 and w.info["lumo"] == pytest.approx(0.0687 * HARTREE, rel=1e-7)
    assert guess_format(d) == "qm9"
    recs = read_all(d)
    assert [r.mol_id for r in recs] == ["gdb_1", "gdb_3"]
    _check_ch4(recs[0])
    tar = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(tar, "w:bz2") as t:
        for p in sorted(d.iterdir()):
            t.add(p, arcname=p.name)
    assert guess_format(tar) == "qm9"
    recs = read_all(tar)
    assert [r.mol_id for r in recs] == ["gdb_1", "gdb_3"] and recs[1].info["member"] == "dsgdb9nsd_000003.xyz"
    _check_ch4(recs[0])
    assert set(QM9_UNITS) >= {"mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"}
    assert QM9_UNITS["homo"] == "eV" and QM9_UNITS["mu"] == "Debye" and QM9_UNITS["Cv"] == "cal/(mol K)"


def test_qm9_bad_xyz_names_member(tmp_path):
    d = tmp_path / "qm9"
    d.mkdir()
    (d / "dsgdb9nsd_000001.xyz").write_text(QM9_CH4)
    (d / "dsgdb9nsd_000002.xyz").write_text(QM9_CH4.replace("-0.3877", "oops"))
    with pytest.raises(DataError, match=r"qm9.*record 1.*dsgdb9nsd_000002\.xyz.*non-numeric"):
        read_all(d)


def test_qm9_sdf_and_csv(tmp_path):
    ch4 = np.array([[-0.0127, 1.0858, 0.0080], [0.0022, -0.0060, 0.0020], [1.0117, 1.4638, 0.0003],
                    [-0.5408, 1.4475, -0.8766], [-0.5238, 1.4379, 0.9064]])
    sdf = tmp_path / "gdb9.sdf"
    sdf.write_text(_sdf_block("gdb_1", ("C", "H", "H", "H", "H"), ch4, [(1, k, 1) for k in range(2, 6)]) + "$$$$\n"
                   + _sdf_block("gdb_3", *WATER_BLOCK) + "$$$$\n")
    header = "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,u0_atom,u298_atom,h298_atom,g298_atom"
    rows = [
        "gdb_3,799.58812,437.90386,282.94545,1.8511,6.31,-0.2928,0.0687,0.3615,19.0002,0.021375,-76.404702,"
        "-76.401867,-76.400922,-76.422349,6.002,-232.8,-233.9,-234.5,-215.4",
        "gdb_1,157.7118,157.70997,157.70699,0.0,13.21,-0.3877,0.1171,0.5048,35.3641,0.044749,-40.47893,"
        "-40.476062,-40.475117,-40.498597,6.469,-395.999594594,-398.643290011,-401.014646522,-372.471772148",
    ]
    (tmp_path / "gdb9.sdf.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    assert guess_format(sdf) == "qm9"
    recs = read_all(sdf)
    assert [r.mol_id for r in recs] == ["gdb_1", "gdb_3"]
    _check_ch4(recs[0])
    assert recs[0].info["U0_atom"] == pytest.approx(-395.999594594 * KCAL, rel=1e-6)
    np.testing.assert_allclose(recs[1].pos, WATER, atol=1e-4)
    assert recs[1].info["U"] == pytest.approx(-76.401867 * HARTREE, rel=1e-7)


def test_qm9_extxyz_with_info(tmp_path):
    path = tmp_path / "qm9_small.xyz"
    path.write_text(
        '5\nProperties=species:S:1:pos:R:3 A=157.7118 B=157.70997 C=157.70699 mu=0 alpha=13.21 '
        'epsHOMO=-0.3877 epsLUMO=0.1171 epsgap=0.5048 <R2>=35.3641 zpve=0.044749 U0=-40.47893 '
        'U=-40.476062 H=-40.475117 G=-40.498597 Cv=6.469 pbc="F F F"\n'
        + "".join(line.split("\t")[0] + " " + " ".join(line.split("\t")[1:4]) + "\n"
                  for line in QM9_CH4.splitlines()[2:7])
    )
    assert guess_format(path) == "qm9"
    (r,) = read_all(path)
    r.mol_id = "gdb_1"
    _check_ch4(r)


# ----------------------------------------------------------------------- dispatch and errors


def test_registry_and_unknown_formats(tmp_path):
    assert set(READERS) >= {"md17", "rmd17", "md22", "ani1x", "spice", "pcqm4mv2", "qm9", "ase"}
    mystery = tmp_path / "mystery.bin"
    mystery.write_bytes(b"\x00\x01\x02 not a known format")
    with pytest.raises(DataError, match=r"mystery\.bin.*cannot tell"):
        guess_format(mystery)
    with pytest.raises(DataError, match=r"mystery\.bin.*cannot tell"):
        read_all(mystery)
    with pytest.raises(DataError, match=r"unknown format 'nope'.*'spice'"):
        read_all(mystery, format="nope")
    h5 = tmp_path / "other.h5"
    with h5py.File(h5, "w") as f:
        f.create_group("x")["y"] = np.zeros(3)
    with pytest.raises(DataError, match=r"other\.h5.*cannot tell"):
        read_all(h5)
    sdf = tmp_path / "random.sdf"
    sdf.write_text(_sdf_block("", *WATER_BLOCK) + "$$$$\n")
    with pytest.raises(DataError, match=r"random\.sdf.*pcqm4mv2"):
        read_all(sdf)
    assert read_all(sdf, format="pcqm4mv2")[0].n_atoms == 3
    with pytest.raises(DataError, match=r"random\.sdf.*'pcqm4mv2' reader does not take option\(s\) \['level'\]"):
        read_all(sdf, format="pcqm4mv2", level="wb97x_dz")


def test_ase_formats_still_dispatch(tmp_path):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    a = Atoms("OH2", positions=WATER)
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.ones((3, 3)))
    path = tmp_path / "w.extxyz"
    ase.io.write(path, [a, a], format="extxyz")
    assert guess_format(path) == "ase"
    assert len(read_all(path, format="extxyz")) == 2
    assert read_all(path, format="ase")[0].energy == -1.0


# ------------------------------------------------------------------ real files in shared/data


@needs_shared
def test_real_spice_fixture():
    path = SHARED / "modelforge_spice_ani1x_fixtures" / "SPICE-1.1.4_n2.hdf5"
    recs = read_all(path)
    groups = {}
    for r in recs:
        groups.setdefault(r.mol_id, []).append(r)
    assert len(recs) == 55 and {k: len(v) for k, v in groups.items()} == {"103147721": 50, "C#C.[Na+]": 5}
    assert groups["103147721"][0].n_atoms == 27 and {r.charge for r in recs} == {1}
    with h5py.File(path) as f:
        e0 = f["103147721/dft_total_energy"][0]
        g0 = f["103147721/dft_total_gradient"][0].astype(np.float64)
        x0 = f["103147721/conformations"][0].astype(np.float64)
    r = groups["103147721"][0]
    assert r.energy == pytest.approx(e0 * HARTREE, rel=1e-7)
    np.testing.assert_allclose(r.forces, -g0 * HARTREE / BOHR, rtol=1e-6)
    np.testing.assert_allclose(r.pos, x0 * BOHR, rtol=1e-6)
    # sign check on real data: for conformers ~0.1 A apart, E_j - E_i ~ -(F_i + F_j)/2 . (x_j - x_i)
    na = groups["C#C.[Na+]"]
    checked = 0
    for i in range(len(na)):
        for j in range(i + 1, len(na)):
            dx = na[j].pos - na[i].pos
            if np.linalg.norm(dx) < 0.11:
                de = na[j].energy - na[i].energy
                work = -0.5 * np.sum((na[i].forces + na[j].forces) * dx)
                assert np.sign(de) == np.sign(work) and abs(de - work) < 0.2 * abs(de)
                checked += 1
    assert checked >= 3


@needs_shared
def test_real_ani1x_fixture():
    path = SHARED / "modelforge_spice_ani1x_fixtures" / "ani1_n5.hdf5"
    recs = read_all(path)
    assert len(recs) == 8 and len({r.mol_id for r in recs}) == 5
    assert all(r.forces is not None for r in recs)
    assert all(-17000 < r.energy < -13000 for r in recs)  # -486 to -581 Hartree
    with h5py.File(path) as f:
        e = f["C1H6N2O5/wb97x_dz.energy"][1]
        fz = f["C1H6N2O5/wb97x_dz.forces"][1].astype(np.float64)
    r = next(r for r in recs if r.info["group"] == "C1H6N2O5" and r.info["conformer"] == 1)
    assert r.energy == pytest.approx(e * HARTREE, rel=1e-7)
    np.testing.assert_allclose(r.forces, fz * HARTREE, rtol=1e-6)
    assert "ccsd(t)_cbs.energy" not in r.info  # NaN at that level for this conformer
    cc = read_all(path, level="ccsd(t)_cbs")
    assert len(cc) == 6 and all(c.forces is None for c in cc)
    assert len(read_all(path, level="wb97x_tz")) == 8


@needs_shared
def test_real_qm9_extxyz():
    recs = read_all(SHARED / "metatrain_qm9_100" / "qm9_reduced_100.xyz")
    assert len(recs) == 100 and all(r.equilibrium and r.forces is None for r in recs)
    ch4 = recs[0]
    assert ch4.z.tolist() == [6, 1, 1, 1, 1]
    assert ch4.energy == pytest.approx(-40.47893 * HARTREE, rel=1e-7)
    assert ch4.info["homo"] == pytest.approx(-0.3877 * HARTREE, rel=1e-7)
    assert ch4.info["alpha"] == 13.21 and ch4.info["Cv"] == 6.469
    gaps = np.array([r.info["gap"] for r in recs])
    assert 3 < gaps.min() and gaps.max() < 20  # eV


@needs_shared
def test_real_rmd17_ethanol_extxyz_via_ase():
    recs = read_all(SHARED / "botnet_ethanol_rmd17" / "train.xyz")
    assert len(recs) == 1000
    e = np.array([r.energy for r in recs])
    f = np.concatenate([r.forces.ravel() for r in recs])
    assert e.mean() == pytest.approx(-4209.6, abs=0.5)
    assert f.std() == pytest.approx(1.19, abs=0.02)


@needs_shared
def test_real_schnetpack_fixtures():
    d = SHARED / "schnetpack_fixtures"
    qm9 = read_all(d / "test_qm9.db")
    assert len(qm9) == 19 and qm9[0].energy == pytest.approx(-40.47893 * HARTREE, rel=1e-6)
    # schnetpack stored mu, alpha, r2 in e*A, A^3, A^2: converted back they match the original QM9 values
    ref = read_all(SHARED / "metatrain_qm9_100" / "qm9_reduced_100.xyz")
    for r in qm9:
        match = [x for x in ref if x.n_atoms == r.n_atoms and np.allclose(x.pos, r.pos, atol=1e-4)]
        assert len(match) == 1
        for k in ("mu", "alpha", "r2", "homo", "zpve", "U0", "Cv", "A"):
            assert r.info[k] == pytest.approx(match[0].info[k], rel=1e-5, abs=1e-4)
    eth = read_all(d / "test_ethanol.db")
    assert len(eth) == 20 and np.mean([r.energy for r in eth]) / KCAL == pytest.approx(-97201, abs=5)
    snip = read_all(d / "ethanol_snip.xyz")
    assert len(snip) == 3 and snip[0].energy == pytest.approx(-97208.40600498248 * KCAL, rel=1e-6)
    with pytest.raises(DataError, match="test_ani1.db"):
        read_all(d / "test_ani1.db")  # energies only in row.data, no unit: not guessed
