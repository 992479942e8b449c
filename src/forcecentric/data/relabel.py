"""Relabel frames: the same geometries with new energies and forces, from GFN2-xTB or DFT.

The workflow it serves: sample a molecule cheaply (``forcecentric label``, GFN2-xTB MD and
normal modes), then label a few of those frames at the level of theory of the reference data
(``forcecentric relabel --method dft``, PySCF) and fine-tune on them. :func:`relabel` works on
records in memory; :func:`relabel_file` is the command's resumable driver: each labelled frame
is saved on its own as soon as it is done, so a killed run loses at most the frame in progress,
and the output file appears, whole, only once every frame is labelled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, ForceCentricError
from .conformation import matches
from .dft import DFTSettings, check_finite_labels

__all__ = ["METHODS", "relabel", "relabel_file", "labeller"]

log = logging.getLogger(__name__)

METHODS = ("xtb", "dft")

Labeller = Callable[[Any, "str | None", "int | None"], "tuple[float, np.ndarray]"]


def labeller(method: str, *, dft: DFTSettings | None = None, xtb_accuracy: float = 1.0) -> tuple[Labeller, str]:
    """``(label, level_of_theory)``: ``label(record, file, index)`` gives ``(energy, forces)``."""
    if method == "xtb":
        from ase import Atoms

        from .label import LEVEL_OF_THEORY, _fresh_labels

        def label(rec, file=None, index=None):
            atoms = Atoms(numbers=rec.z, positions=rec.pos)
            atoms.info["charge"] = int(rec.charge)
            energy, forces = _fresh_labels(atoms, xtb_accuracy)
            check_finite_labels(energy, forces, "GFN2-xTB returned a non-finite energy or force",
                                file=file, record=index)
            return float(energy), np.asarray(forces, dtype=np.float64)

        return label, LEVEL_OF_THEORY
    if method == "dft":
        from .dft import dft_labels, require_pyscf

        require_pyscf()
        settings = dft or DFTSettings()

        def label(rec, file=None, index=None):
            mult = rec.info.get("multiplicity")
            return dft_labels(rec.z, rec.pos, int(rec.charge), None if mult is None else int(mult), settings,
                              file=file, record=index)

        return label, settings.level_of_theory
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _relabelled(rec, energy: float, forces: np.ndarray, level_of_theory: str, **extra):
    """A copy of ``rec`` with new labels; its old level of theory is kept in ``info``.

    A minimum of one level of theory is not a minimum of another: a relabelled equilibrium record
    becomes an off-equilibrium one (its new forces are labels), marked ``info["was_equilibrium"]``.
    """
    info = dict(rec.info, relabelled_from=rec.level_of_theory or "unknown", **extra)
    if rec.equilibrium:
        info["was_equilibrium"] = True
    return dataclasses.replace(rec, energy=float(energy), forces=np.array(forces, dtype=np.float64),
                               level_of_theory=level_of_theory, equilibrium=False, info=info)


def relabel(records: Sequence, method: str = "xtb", *, dft: DFTSettings | None = None,
            xtb_accuracy: float = 1.0, file: str | None = None, progress: bool = False) -> list:
    """The same geometries with fresh ``method`` labels, in memory (see :func:`labeller`).

    A failed frame raises a :class:`~forcecentric.errors.DataError` naming ``file`` (where the
    frames came from) and the frame's position in ``records``.
    """
    label, lot = labeller(method, dft=dft, xtb_accuracy=xtb_accuracy)
    records = list(records)
    out = []
    with _threads(method, None):
        for i, rec in enumerate(_progress(records, progress, f"relabel ({lot})")):
            energy, forces = label(rec, file, i)
            out.append(_relabelled(rec, energy, forces, lot))
    return out


def _progress(items, on: bool, desc: str):
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="frame")


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def relabel_file(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "dft",
    *,
    n: int | None = None,
    seed: int = 0,
    select: dict[str, Any] | None = None,
    dft: DFTSettings | None = None,
    xtb_accuracy: float = 1.0,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Relabel the frames of ``inputs`` (any format :func:`forcecentric.data.read` knows) into
    the extended-XYZ file ``out``.

    Args:
        inputs: structure files, read in order; the frames ``select`` keeps are numbered across
            them from 0.
        out: the labelled frames, written atomically once all are done.
        method: ``"xtb"`` (GFN2-xTB, tblite) or ``"dft"`` (PySCF, ``dft`` settings).
        select: keep only the frames that have each ``key: value`` (an ``info`` key, ``mol_id``,
            ``source`` or ``level_of_theory``; compared as strings) before numbering and drawing.
        n: label only ``n`` frames drawn at random (without replacement, seeded by ``seed``), kept
            in their input order; None labels every frame.
        threads: OpenMP threads for the DFT code (default: all cores); GFN2-xTB runs on one.

    Each labelled frame carries ``info["relabel_index"]`` (its number in the inputs) and
    ``info["relabelled_from"]`` (its old level of theory). Frames done so far are kept in
    ``OUT.partial/`` (one file each); a new call with the same inputs and settings skips them,
    and a call with other settings is refused rather than mixing two kinds of labels.

    Returns:
        a report: frames labelled, resumed, seconds per frame, level of theory.

    Raises:
        DataError: a frame fails (the message names its file and its record); the frames done
        before it are kept for the next call.
    """
    from . import read_all
    from .label import write_extxyz

    out = Path(out)
    if out.exists():
        raise ForceCentricError(f"{out} exists; relabel writes a new file (remove it or choose another --out)")
    label, lot = labeller(method, dft=dft, xtb_accuracy=xtb_accuracy)
    frames: list[tuple[str, int, Any]] = []  # (file, record within file, record)
    for path in inputs:
        frames.extend((str(path), i, rec) for i, rec in enumerate(read_all(path)) if matches(rec, select or {}))
    if not frames:
        raise DataError(f"no frame matches select {select}", file=", ".join(map(str, inputs)))
    if n is not None:
        if not 0 < n <= len(frames):
            raise DataError(f"--n {n}, but the inputs hold {len(frames)} frames"
                            + (f" matching select {select}" if select else ""), file=", ".join(map(str, inputs)))
        chosen = sorted(np.random.default_rng(seed).choice(len(frames), size=n, replace=False).tolist())
    else:
        chosen = list(range(len(frames)))
    settings = {
        "inputs": [str(Path(p).resolve()) for p in inputs], "n_frames_in_inputs": len(frames),
        "select": {k: str(v) for k, v in (select or {}).items()}, "chosen": chosen, "method": method, "level_of_theory": lot,
        "dft": dataclasses.asdict(dft or DFTSettings()) if method == "dft" else None,
        "xtb_accuracy": xtb_accuracy if method == "xtb" else None,
    }
    partial = _partial_dir(out)
    stamp = partial / "settings.json"
    if stamp.is_file():
        before = json.loads(stamp.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise ForceCentricError(
                f"{partial} holds frames labelled with other settings (differing: {', '.join(changed)}); "
                "rerun with the same inputs and settings to resume, or delete it to start anew")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, stamp)

    def frame_file(index: int) -> Path:
        return partial / f"{index:07d}.extxyz"

    todo = [i for i in chosen if not frame_file(i).is_file()]
    resumed = len(chosen) - len(todo)
    if resumed:
        log.info("resuming: %d of %d frames already labelled in %s", resumed, len(chosen), partial)
    seconds = []
    with _threads(method, threads):
        for index in _progress(todo, progress, f"relabel ({lot})"):
            file, record, rec = frames[index]
            t0 = time.perf_counter()
            energy, forces = label(rec, file, record)
            seconds.append(time.perf_counter() - t0)
            new = _relabelled(rec, energy, forces, lot, relabel_index=index)
            write_extxyz(frame_file(index), [new.to_atoms()])
    done = [r for i in chosen for r in read_all(frame_file(i))]
    write_extxyz(out, [r.to_atoms() for r in done])
    shutil.rmtree(partial)
    return {"out": str(out), "frames": len(done), "labelled_now": len(todo), "resumed": resumed,
            "level_of_theory": lot, "method": method,
            "seconds_per_frame_median": float(np.median(seconds)) if seconds else None}


def _threads(method: str, threads: int | None):
    """OpenMP threads while labelling: one for GFN2-xTB (tblite gains nothing from more and its
    threads spin-wait on shared cores), ``threads`` for DFT (PySCF; None leaves its default)."""
    if method == "xtb":
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1, user_api="openmp")
    if threads is not None:
        from pyscf import lib

        return lib.with_omp_threads(threads)
    return contextlib.nullcontext()
