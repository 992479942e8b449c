"""MD stability and quality metrics for isolated molecules.

Implements the simulation-based protocol of Fu et al., "Forces are Not Enough: Benchmark and
Critical Evaluation for Machine Learning Force Fields with Molecular Simulations" (TMLR 2023):

* **Stability**: a trajectory becomes unstable at the first saved frame in which any bond of the
  reference structure deviates from its reference length by more than 0.5 Angstrom (the paper's
  threshold, the default here); the stable time is the simulated time of that frame.
* **h(r)**: the distribution of all interatomic distances, histogrammed with 500 bins over
  0-10 Angstrom (the paper's protocol, the defaults here); its quality metric is the MAE
  ``integral |h(r) - h_ref(r)| dr``, which ranges from 0 to 2.
* Energy drift (eV/atom/ps) of NVE runs and simulation speed (steps/s, ns/day).

No periodic boundary conditions are applied. Units: Angstrom, eV, ps.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import NeighborList, natural_cutoffs

__all__ = [
    "reference_bonds",
    "bond_deviation",
    "first_unstable_frame",
    "stable_time",
    "distance_histogram",
    "hr_mae",
    "energy_drift",
    "simulation_speed",
]

# Largest number of pair distances processed at once by distance_histogram. Each distance costs
# about 8 float64 values of temporaries (two gathered (P, 3) blocks, the distance and its mask),
# so 1e6 distances keep the peak near 60 MB.
_CHUNK_DISTANCES = 1_000_000


def _check_pairs(pairs, lengths, n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.asarray(pairs, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.float64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (B, 2), got {pairs.shape}")
    if lengths.shape != (pairs.shape[0],):
        raise ValueError(f"lengths must have shape ({pairs.shape[0]},) to match pairs, got {lengths.shape}")
    if pairs.size and (pairs.min() < 0 or pairs.max() >= n_atoms):
        raise ValueError(f"pair indices must lie in [0, {n_atoms}), got range [{pairs.min()}, {pairs.max()}]")
    return pairs, lengths


def _as_trajectory(positions, name: str = "positions") -> np.ndarray:
    """(T, N, 3) float64 view of a trajectory; a single (N, 3) frame becomes T = 1."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) or (T, N, 3), got {np.shape(positions)}")
    return pos


def reference_bonds(atoms: Atoms, mult: float = 1.0, *, skin: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Bonded pairs of a reference structure from ASE's natural (covalent) cutoffs.

    Uses ``ase.neighborlist.NeighborList(natural_cutoffs(atoms, mult=mult), skin=skin,
    self_interaction=False, bothways=False)`` on a non-periodic copy of ``atoms``. ASE adds ``skin``
    to every atomic radius, so atoms i and j are bonded when
    ``d_ij < mult * (r_cov_i + r_cov_j) + 2 * skin``. The default ``skin=0.3`` is ASE's default and
    what Fu et al.'s reference code uses; with ``skin=0`` the bare covalent-radius sum misses
    ordinary bonds (e.g. C-H 1.09 A > 0.76 + 0.31 A).

    Args:
        atoms: Reference structure (positions in Angstrom); periodicity is ignored.
        mult: Factor on the covalent radii.
        skin: Extra radius in Angstrom added to each atom's cutoff.

    Returns:
        ``(pairs, lengths)``: ``pairs`` (B, 2) int64 with ``i < j``, sorted lexicographically;
        ``lengths`` (B,) float64 reference bond lengths in Angstrom.

    Raises:
        ValueError: Fewer than 2 atoms, or no bond found.
    """
    formula = atoms.get_chemical_formula()
    if len(atoms) < 2:
        raise ValueError(f"reference_bonds needs at least 2 atoms, {formula!r} has {len(atoms)}")
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    if not np.isfinite(positions).all():
        raise ValueError(f"reference structure {formula!r} has non-finite positions")
    mol = Atoms(numbers=atoms.get_atomic_numbers(), positions=positions, pbc=False)
    nl = NeighborList(natural_cutoffs(mol, mult=mult), skin=skin, self_interaction=False, bothways=False)
    nl.update(mol)
    keys = list(nl.get_connectivity_matrix(sparse=True).keys())
    if not keys:
        raise ValueError(
            f"no bonds found in {formula!r} with natural cutoffs (mult={mult}, skin={skin}); "
            "is this a bonded molecule with positions in Angstrom?"
        )
    pairs = np.sort(np.asarray(keys, dtype=np.int64).reshape(-1, 2), axis=1)
    pairs = np.unique(pairs, axis=0)  # lexicographically sorted, duplicates removed
    lengths = np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]], axis=1)
    return pairs, lengths


def bond_deviation(positions: np.ndarray, pairs: np.ndarray, lengths: np.ndarray) -> np.ndarray | float:
    """Largest bond-length deviation ``max_b |d_b - d_b_ref|`` in Angstrom.

    Args:
        positions: (N, 3) frame or (T, N, 3) trajectory in Angstrom.
        pairs: (B, 2) bonded atom indices.
        lengths: (B,) reference bond lengths in Angstrom.

    Returns:
        A float for an (N, 3) frame, a (T,) array for a trajectory. NaN where positions are not
        finite; 0 when there are no bonds.
    """
    pos = np.asarray(positions, dtype=np.float64)
    single = pos.ndim == 2
    traj = _as_trajectory(pos)
    pairs, lengths = _check_pairs(pairs, lengths, traj.shape[1])
    if pairs.shape[0] == 0:
        dev = np.zeros(traj.shape[0])
    else:
        d = np.linalg.norm(traj[:, pairs[:, 1]] - traj[:, pairs[:, 0]], axis=-1)  # (T, B)
        diff = np.abs(d - lengths)
        # np.max propagates NaN, so a frame with non-finite bonded positions reads as NaN.
        dev = diff.max(axis=1)
    return float(dev[0]) if single else dev


def worst_bond(positions: np.ndarray, pairs: np.ndarray, lengths: np.ndarray) -> tuple[int, float]:
    """The bond of one (N, 3) frame that deviates most from its reference length.

    Returns its index in ``pairs`` and its signed deviation ``d - d_ref`` in Angstrom (NaN when the
    frame's bonded positions are not finite).
    """
    pos = np.asarray(positions, dtype=np.float64)
    pairs, lengths = _check_pairs(pairs, lengths, pos.shape[0])
    d = np.linalg.norm(pos[pairs[:, 1]] - pos[pairs[:, 0]], axis=-1) - lengths
    if not np.all(np.isfinite(d)):
        return int(np.argmin(np.isfinite(d))), float("nan")
    k = int(np.argmax(np.abs(d)))
    return k, float(d[k])


def min_pair_distance(positions: np.ndarray) -> np.ndarray:
    """Smallest interatomic distance of every frame of a (T, N, 3) trajectory, in Angstrom (NaN
    for frames with non-finite positions)."""
    traj = _as_trajectory(positions)
    t, n, _ = traj.shape
    out = np.empty(t)
    iu = np.triu_indices(n, k=1)
    chunk = max(1, _CHUNK_DISTANCES // max(1, len(iu[0])))
    for start in range(0, t, chunk):
        block = traj[start:start + chunk]
        d = np.linalg.norm(block[:, iu[0]] - block[:, iu[1]], axis=-1)
        out[start:start + chunk] = d.min(axis=1) if d.shape[1] else np.inf
    return out


def first_unstable_frame(
    positions: np.ndarray, pairs, lengths, threshold: float = 0.5, min_distance: float | None = None
) -> int | None:
    """Index of the first frame in which a bond deviates by more than ``threshold``.

    Args:
        positions: (T, N, 3) trajectory in Angstrom (a single (N, 3) frame is T = 1).
        pairs: (B, 2) bonded atom indices, e.g. from :func:`reference_bonds`.
        lengths: (B,) reference bond lengths in Angstrom.
        threshold: Largest allowed deviation in Angstrom (0.5 in Fu et al.); a frame is unstable
            only when a deviation is strictly greater.
        min_distance: Also unstable when any two atoms come closer than this (Angstrom). Fu et
            al.'s criterion (None) watches bonds only and misses atoms that collapse onto each
            other while every bond keeps its length (e.g. two hydrogens of a methyl group).

    Returns:
        The first unstable frame index, or None if every frame is stable. A frame with any
        non-finite position is unstable.
    """
    traj = _as_trajectory(positions)
    dev = np.atleast_1d(bond_deviation(traj, pairs, lengths))
    finite = np.isfinite(traj).all(axis=(1, 2)) & np.isfinite(dev)
    unstable = ~finite | (dev > threshold)
    if min_distance is not None:
        unstable |= min_pair_distance(traj) < min_distance
    hits = np.flatnonzero(unstable)
    return int(hits[0]) if hits.size else None


def stable_time(
    times_ps: np.ndarray, positions, pairs, lengths, threshold: float = 0.5, min_distance: float | None = None
) -> float:
    """Fu et al.'s stability: the simulated time until the trajectory becomes unstable.

    Args:
        times_ps: (T,) simulation time of each saved frame in ps.
        positions: (T, N, 3) trajectory in Angstrom.
        pairs: (B, 2) bonded atom indices.
        lengths: (B,) reference bond lengths in Angstrom.
        threshold: Bond-deviation threshold in Angstrom (strictly greater is unstable).
        min_distance: See :func:`first_unstable_frame` (None: Fu et al.'s bond criterion only).

    Returns:
        Time in ps of the first unstable saved frame; the last frame's time if none is unstable.
    """
    traj = _as_trajectory(positions)
    times = np.asarray(times_ps, dtype=np.float64).reshape(-1)
    if times.shape[0] != traj.shape[0]:
        raise ValueError(f"times_ps has {times.shape[0]} entries but the trajectory has {traj.shape[0]} frames")
    if times.shape[0] == 0:
        raise ValueError("stable_time needs at least one frame")
    k = first_unstable_frame(traj, pairs, lengths, threshold, min_distance)
    return float(times[-1] if k is None else times[k])


def distance_histogram(positions: np.ndarray, bins: int = 500, r_max: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """h(r): density of all interatomic distances pooled over frames.

    Every unordered pair i < j of every frame contributes one distance. Counts over ``bins`` equal
    bins on [0, r_max] are divided by the total number of pair distances *including* those beyond
    ``r_max`` and by the bin width, so ``sum(h) * (r_max / bins) == 1`` only when all distances
    fall below ``r_max``; distances beyond ``r_max`` reduce the mass rather than being
    renormalised away. Frames are processed in chunks to bound memory.

    Args:
        positions: (T, N, 3) trajectory or (N, 3) frame in Angstrom.
        bins: Number of bins (500 in Fu et al.).
        r_max: Upper end of the histogram range in Angstrom (10 in Fu et al.).

    Returns:
        ``(bin_centers, h)``: both (bins,); centres in Angstrom, h in 1/Angstrom.

    Raises:
        ValueError: Non-finite positions (the first offending frame is named), fewer than 2
            atoms, or invalid ``bins`` / ``r_max``.
    """
    traj = _as_trajectory(positions)
    n_frames, n_atoms = traj.shape[0], traj.shape[1]
    if n_atoms < 2:
        raise ValueError(f"distance_histogram needs at least 2 atoms, got {n_atoms}")
    if n_frames == 0:
        raise ValueError("distance_histogram needs at least one frame")
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    if not (np.isfinite(r_max) and r_max > 0):
        raise ValueError(f"r_max must be a positive finite number (Angstrom), got {r_max!r}")
    bad = np.flatnonzero(~np.isfinite(traj).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"non-finite positions in frame {int(bad[0])} ({bad.size} bad frame(s) in total)")

    iu, ju = np.triu_indices(n_atoms, k=1)
    n_pairs = iu.shape[0]
    chunk = max(1, _CHUNK_DISTANCES // n_pairs)
    scale = bins / r_max
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, n_frames, chunk):
        block = traj[start : start + chunk]
        diff = block[:, ju]
        diff -= block[:, iu]
        d = np.sqrt(np.einsum("tpk,tpk->tp", diff, diff)).ravel()
        del diff
        d = d[d <= r_max]
        idx = np.minimum((d * scale).astype(np.int64), bins - 1)  # d == r_max goes to the last bin
        counts += np.bincount(idx, minlength=bins)

    dr = r_max / bins
    total = n_frames * n_pairs
    h = counts / (total * dr)
    centers = (np.arange(bins) + 0.5) * dr
    return centers, h


def hr_mae(h: np.ndarray, h_ref: np.ndarray, r_max: float = 10.0) -> float:
    """MAE of h(r) as in Fu et al.: ``integral |h(r) - h_ref(r)| dr``.

    Computed as ``sum |h - h_ref| * dr`` with ``dr = r_max / len(h)``. Ranges from 0 (identical)
    to 2 (disjoint) for two densities.

    Args:
        h: (bins,) density in 1/Angstrom, from :func:`distance_histogram`.
        h_ref: (bins,) reference density on the same bins.
        r_max: Upper end of the histogram range in Angstrom.

    Returns:
        The MAE (dimensionless).

    Raises:
        ValueError: ``h`` and ``h_ref`` differ in shape, or are not 1-D and non-empty.
    """
    h = np.asarray(h, dtype=np.float64)
    h_ref = np.asarray(h_ref, dtype=np.float64)
    if h.shape != h_ref.shape:
        raise ValueError(f"h and h_ref must have the same shape, got {h.shape} and {h_ref.shape}")
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"h must be a non-empty 1-D array, got shape {h.shape}")
    dr = r_max / h.shape[0]
    return float(np.abs(h - h_ref).sum() * dr)


def energy_drift(times_ps: np.ndarray, total_energy: np.ndarray, n_atoms: int) -> float:
    """Drift of the conserved (total) energy in eV per atom per ps.

    Args:
        times_ps: (T,) times in ps.
        total_energy: (T,) total energy in eV.
        n_atoms: Number of atoms.

    Returns:
        Slope of the least-squares line of ``total_energy`` against ``times_ps``, divided by
        ``n_atoms`` (eV/atom/ps); signed.

    Raises:
        ValueError: Fewer than 2 points, mismatched lengths, non-finite values, all times equal
            or ``n_atoms < 1``.
    """
    t = np.asarray(times_ps, dtype=np.float64).reshape(-1)
    e = np.asarray(total_energy, dtype=np.float64).reshape(-1)
    if t.shape != e.shape:
        raise ValueError(f"times_ps and total_energy differ in length: {t.shape[0]} vs {e.shape[0]}")
    if t.shape[0] < 2:
        raise ValueError(f"energy_drift needs at least 2 points, got {t.shape[0]}")
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    if not (np.isfinite(t).all() and np.isfinite(e).all()):
        raise ValueError("times_ps and total_energy must be finite")
    tc = t - t.mean()
    denom = float(tc @ tc)
    if denom == 0.0:
        raise ValueError("energy_drift needs at least two distinct times")
    slope = float(tc @ (e - e.mean())) / denom
    return slope / n_atoms


def simulation_speed(steps: int, timestep_fs: float, wall_s: float) -> dict[str, float]:
    """Throughput of a simulation.

    Args:
        steps: Number of MD steps run.
        timestep_fs: Time step in fs.
        wall_s: Wall-clock time in seconds.

    Returns:
        ``{"steps_per_second": steps / wall_s, "ns_per_day": steps * timestep_fs * 1e-6 / (wall_s / 86400)}``.

    Raises:
        ValueError: ``wall_s <= 0`` (or not finite).
    """
    if not (np.isfinite(wall_s) and wall_s > 0):
        raise ValueError(f"wall_s must be a positive number of seconds, got {wall_s!r}")
    return {
        "steps_per_second": float(steps / wall_s),
        "ns_per_day": float(steps * timestep_fs * 1e-6 / (wall_s / 86400.0)),
    }
