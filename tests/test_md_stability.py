"""MD stability and quality metrics (Fu et al., TMLR 2023): hand-computed values."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from forcecentric.md import stability as metrics
from forcecentric.md.stability import (
    bond_deviation,
    distance_histogram,
    energy_drift,
    first_unstable_frame,
    hr_mae,
    reference_bonds,
    simulation_speed,
    stable_time,
)


@pytest.fixture
def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def _ch_bond(atoms: Atoms, pairs: np.ndarray) -> tuple[int, int]:
    """(carbon, hydrogen) indices of the first C-H bond."""
    sym = atoms.get_chemical_symbols()
    for i, j in pairs:
        if {sym[i], sym[j]} == {"C", "H"}:
            return (int(i), int(j)) if sym[i] == "C" else (int(j), int(i))
    raise AssertionError("no C-H bond")


def _stretched(atoms: Atoms, c: int, h: int, stretch: np.ndarray) -> np.ndarray:
    """(T, N, 3) copies of atoms with H moved away from C along the bond by stretch[t] Angstrom."""
    pos0 = atoms.get_positions()
    u = (pos0[h] - pos0[c]) / np.linalg.norm(pos0[h] - pos0[c])
    traj = np.repeat(pos0[None], len(stretch), axis=0)
    traj[:, h] += np.asarray(stretch)[:, None] * u
    return traj


# ---------------------------------------------------------------- reference_bonds


def test_reference_bonds_water():
    water = molecule("H2O")
    pairs, lengths = reference_bonds(water)
    sym = water.get_chemical_symbols()
    assert pairs.dtype == np.int64 and lengths.dtype == np.float64
    assert pairs.shape == (2, 2)
    assert all(sorted((sym[i], sym[j])) == ["H", "O"] for i, j in pairs)
    assert np.all(pairs[:, 0] < pairs[:, 1])
    expected = [water.get_distance(int(i), int(j)) for i, j in pairs]
    np.testing.assert_allclose(lengths, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lengths, 0.968565, atol=1e-5)


def test_reference_bonds_ethanol(ethanol):
    pairs, lengths = reference_bonds(ethanol)
    assert pairs.shape == (8, 2) and lengths.shape == (8,)
    assert np.all(pairs[:, 0] < pairs[:, 1])
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    np.testing.assert_array_equal(order, np.arange(8))
    sym = ethanol.get_chemical_symbols()
    kinds = sorted("".join(sorted((sym[i], sym[j]))) for i, j in pairs)
    assert kinds == ["CC", "CH", "CH", "CH", "CH", "CH", "CO", "HO"]
    d = ethanol.get_all_distances()
    np.testing.assert_allclose(lengths, d[pairs[:, 0], pairs[:, 1]], atol=1e-12)
    # Bare covalent radii (no skin) miss C-H (1.09 > 0.76 + 0.31 Angstrom): only C-C survives.
    assert reference_bonds(ethanol, skin=0.0)[0].tolist() == [[0, 1]]


def test_reference_bonds_ignores_periodicity():
    water = molecule("H2O")
    water.set_cell([2.0, 2.0, 2.0])
    water.set_pbc(True)
    pairs, _ = reference_bonds(water)
    assert pairs.shape == (2, 2)


def test_reference_bonds_errors():
    with pytest.raises(ValueError, match="at least 2 atoms"):
        reference_bonds(Atoms("H", positions=[[0, 0, 0]]))
    with pytest.raises(ValueError, match="Ar2"):
        reference_bonds(Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 8.0]]))


# ---------------------------------------------------------------- stability


def test_bond_deviation_shapes(ethanol):
    pairs, lengths = reference_bonds(ethanol)
    c, h = _ch_bond(ethanol, pairs)
    assert bond_deviation(ethanol.get_positions(), pairs, lengths) == pytest.approx(0.0, abs=1e-12)
    traj = _stretched(ethanol, c, h, np.array([0.0, 0.1, -0.3]))
    dev = bond_deviation(traj, pairs, lengths)
    assert isinstance(dev, np.ndarray) and dev.shape == (3,)
    np.testing.assert_allclose(dev, [0.0, 0.1, 0.3], atol=1e-12)
    assert isinstance(bond_deviation(traj[1].tolist(), pairs.tolist(), lengths.tolist()), float)


def test_first_unstable_frame_stretched_bond(ethanol):
    pairs, lengths = reference_bonds(ethanol)
    c, h = _ch_bond(ethanol, pairs)
    stretch = np.zeros(12)
    stretch[:7] = np.linspace(0.0, 0.4, 7)
    stretch[7] = 0.6
    stretch[8:] = 1.0
    traj = _stretched(ethanol, c, h, stretch)
    assert first_unstable_frame(traj, pairs, lengths) == 7
    assert first_unstable_frame(list(traj), pairs, lengths, threshold=0.7) == 8
    times = np.arange(12) * 0.05
    assert stable_time(times, traj, pairs, lengths) == pytest.approx(0.35)


def test_intact_trajectory_is_stable(ethanol):
    pairs, lengths = reference_bonds(ethanol)
    rng = np.random.default_rng(0)
    traj = ethanol.get_positions()[None] + rng.normal(0.0, 0.02, size=(50, len(ethanol), 3))
    assert first_unstable_frame(traj, pairs, lengths) is None
    times = 0.1 + np.arange(50) * 0.02
    assert stable_time(times, traj, pairs, lengths) == pytest.approx(times[-1])


def test_threshold_is_strict(ethanol):
    # A bond of 0.75 stretched to 1.25 Angstrom deviates by exactly 0.5 (all exact in binary).
    pos = np.array([[[0.0, 0, 0], [0.75, 0, 0]], [[0.0, 0, 0], [1.25, 0, 0]], [[0.0, 0, 0], [1.2500001, 0, 0]]])
    pairs, lengths = np.array([[0, 1]]), np.array([0.75])
    assert bond_deviation(pos[1], pairs, lengths) == 0.5
    assert first_unstable_frame(pos[:2], pairs, lengths) is None
    assert first_unstable_frame(pos, pairs, lengths) == 2
    # Same on ethanol: the frame's own deviation as threshold is stable, anything smaller is not.
    pairs, lengths = reference_bonds(ethanol)
    c, h = _ch_bond(ethanol, pairs)
    traj = _stretched(ethanol, c, h, np.array([0.0, 0.5]))
    dev = bond_deviation(traj[1], pairs, lengths)
    assert dev == pytest.approx(0.5, abs=1e-12)
    assert first_unstable_frame(traj, pairs, lengths, threshold=dev) is None
    assert first_unstable_frame(traj, pairs, lengths, threshold=np.nextafter(dev, 0.0)) == 1


def test_nan_frame_is_unstable(ethanol):
    pairs, lengths = reference_bonds(ethanol)
    traj = np.repeat(ethanol.get_positions()[None], 6, axis=0)
    traj[3, 4, 1] = np.nan
    traj[5, 0, 0] = np.inf
    assert first_unstable_frame(traj, pairs, lengths) == 3
    times = np.linspace(0.0, 1.0, 6)
    assert stable_time(times, traj, pairs, lengths) == pytest.approx(0.6)
    # Non-finite coordinates of an atom that is in no bond also make the frame unstable.
    extra = np.concatenate([traj[:3], np.full((3, 1, 3), np.nan)], axis=1)
    assert first_unstable_frame(extra, pairs, lengths) == 0


def test_stable_time_length_mismatch(ethanol):
    pairs, lengths = reference_bonds(ethanol)
    traj = np.repeat(ethanol.get_positions()[None], 4, axis=0)
    with pytest.raises(ValueError, match="3 entries.*4 frames"):
        stable_time(np.arange(3.0), traj, pairs, lengths)


# ---------------------------------------------------------------- h(r)

DR = 10.0 / 500


def _bin(r: float) -> int:
    return int(r / DR)


def test_distance_histogram_hand_computed():
    # Distances 1.005, 1.505, 2.51: inside bins 50, 75, 125 (dr = 0.02), away from bin edges.
    pos = np.array([[0.0, 0, 0], [1.005, 0, 0], [2.51, 0, 0]])
    centers, h = distance_histogram(pos)
    assert centers.shape == (500,) and h.shape == (500,)
    np.testing.assert_allclose(centers[[0, -1]], [0.01, 9.99])
    nz = np.flatnonzero(h)
    assert nz.tolist() == [_bin(1.005), _bin(1.505), _bin(2.51)] == [50, 75, 125]
    for k, r in zip(nz, (1.005, 1.505, 2.51)):
        assert abs(centers[k] - r) <= DR / 2
    np.testing.assert_allclose(h[nz], (1 / 3) / 0.02)
    assert h.sum() * DR == pytest.approx(1.0)


def test_distance_histogram_mass_beyond_rmax():
    pos = np.array([[0.0, 0, 0], [1.01, 0, 0], [11.0, 0, 0]])  # 1.01, 9.99 inside; 11.0 beyond
    _, h = distance_histogram(pos, bins=500, r_max=10.0)
    assert np.flatnonzero(h).tolist() == [50, 499]
    np.testing.assert_allclose(h[[50, 499]], (1 / 3) / DR)
    assert h.sum() * DR == pytest.approx(2 / 3)


def test_distance_histogram_pools_frames():
    a = np.array([[0.0, 0, 0], [1.005, 0, 0], [2.51, 0, 0]])  # 1.005, 1.505, 2.51
    b = np.array([[0.0, 0, 0], [0, 2.005, 0], [0, 4.01, 0]])  # 2.005, 2.005, 4.01
    _, h = distance_histogram(np.stack([a, b]))
    assert np.flatnonzero(h).tolist() == [50, 75, 100, 125, 200]
    np.testing.assert_allclose(h[[50, 75, 100, 125, 200]], np.array([1, 1, 2, 1, 1]) / 6 / DR)
    assert h.sum() * DR == pytest.approx(1.0)
    _, ha = distance_histogram(a)
    _, hb = distance_histogram([b])
    np.testing.assert_allclose(h, (ha + hb) / 2)


def test_distance_histogram_chunking_matches(monkeypatch):
    rng = np.random.default_rng(1)
    traj = rng.uniform(0.0, 6.0, size=(37, 9, 3))
    _, h_full = distance_histogram(traj, bins=120, r_max=8.0)
    monkeypatch.setattr(metrics, "_CHUNK_DISTANCES", 50)  # 36 pairs -> one frame per chunk
    _, h_chunked = distance_histogram(traj, bins=120, r_max=8.0)
    np.testing.assert_array_equal(h_full, h_chunked)
    # Reference: np.histogram of all distances, normalised by the total count.
    iu, ju = np.triu_indices(9, k=1)
    d = np.linalg.norm(traj[:, ju] - traj[:, iu], axis=-1).ravel()
    counts, _ = np.histogram(d, bins=120, range=(0.0, 8.0))
    np.testing.assert_allclose(h_full, counts / (d.size * 8.0 / 120), rtol=1e-12)


def test_distance_histogram_memory_bounded():
    rng = np.random.default_rng(2)
    traj = rng.uniform(0.0, 8.0, size=(20_000, 30, 3))
    tracemalloc.start()
    try:
        _, h = distance_histogram(traj)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"
    assert 0.9 < h.sum() * DR <= 1.0


def test_distance_histogram_errors():
    with pytest.raises(ValueError, match="at least 2 atoms"):
        distance_histogram(np.zeros((4, 1, 3)))
    traj = np.zeros((5, 3, 3))
    traj[:, 1, 0] = 1.0
    traj[:, 2, 1] = 1.0
    traj[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="frame 3"):
        distance_histogram(traj)
    with pytest.raises(ValueError, match="shape"):
        distance_histogram(np.zeros((3, 2)))


# ---------------------------------------------------------------- hr_mae, drift, speed


def test_hr_mae():
    _, h = distance_histogram(np.array([[0.0, 0, 0], [1.005, 0, 0], [2.51, 0, 0]]))
    assert hr_mae(h, h.copy()) == 0.0
    a = np.zeros(500)
    b = np.zeros(500)
    a[10] = 1 / DR
    b[20] = 1 / DR
    assert hr_mae(a, b) == pytest.approx(2.0)
    assert hr_mae(a.tolist(), a * 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        hr_mae(np.zeros(500), np.zeros(400))


def test_energy_drift():
    n = 9
    t = np.linspace(0.0, 10.0, 201)
    e = 3.0 + 0.01 * t * n + np.random.default_rng(3).normal(0.0, 1e-5, t.size)
    assert energy_drift(t, e, n) == pytest.approx(0.01, abs=1e-5)
    assert energy_drift([0.0, 2.0], [1.0, 0.0], 1) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="at least 2"):
        energy_drift([0.0], [1.0], 3)
    with pytest.raises(ValueError, match="distinct"):
        energy_drift([1.0, 1.0], [1.0, 2.0], 3)


def test_simulation_speed():
    speed = simulation_speed(1000, 0.5, 10.0)
    assert speed["steps_per_second"] == pytest.approx(100.0)
    assert speed["ns_per_day"] == pytest.approx(4.32)
    with pytest.raises(ValueError, match="wall_s"):
        simulation_speed(1000, 0.5, 0.0)


def test_min_pair_distance_per_frame():
    line = np.array([[0.0, 0.0, 0.0], [1.005, 0.0, 0.0], [2.51, 0.0, 0.0]])
    squeezed = line.copy()
    squeezed[2, 0] = 1.2
    d = metrics.min_pair_distance(np.stack([line, squeezed]))
    np.testing.assert_allclose(d, [1.005, 0.195])
    pairs, lengths = np.array([[0, 1]]), np.array([1.005])
    assert metrics.first_unstable_frame(np.stack([line, squeezed]), pairs, lengths, 0.5) is None
    assert metrics.first_unstable_frame(np.stack([line, squeezed]), pairs, lengths, 0.5, min_distance=0.5) == 1
