"""Build a conformation store from data files: validate, drop and report bad records, dedup.

:func:`build_store` reads every input with :func:`forcecentric.data.read` (``validate=False``),
checks each record itself (:meth:`Conformation.validate`: NaN/Inf, shapes, the force bound,
atoms closer than ``min_distance``), drops bad records and duplicates into a report instead of
stopping, and writes the rest into a sharded store (:class:`~forcecentric.data.store.StoreWriter`).

Next to the manifest it writes ``build_report.json`` (counts kept / dropped by reason, the first
``report_limit`` dropped records) and ``dropped.csv`` (every dropped record: file, record index,
category, reason). Both are complete after a resumed build: the number of records consumed from
each input, the counters and the length of ``dropped.csv`` are saved in the manifest with every
complete shard, so ``resume=True`` continues exactly after what the complete shards hold.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .conformation import MIN_DISTANCE, Conformation, matches
from .store import MANIFEST, StoreWriter, atomic_write_json, read_manifest

__all__ = ["build_store", "classify_problem", "REPORT", "DROPPED"]

REPORT = "build_report.json"
DROPPED = "dropped.csv"
_CSV_HEADER = ["file", "record", "location", "category", "reason"]
#: ``Conformation.info`` keys that readers of HDF5 / archive / SDF files use to locate a record.
_LOCATION_KEYS = ("group", "conformer", "member", "sdf_index")

Reader = Callable[[str], Iterable[Conformation]]


def classify_problem(problem: str) -> str:
    """A short category for a validation problem (used to count drops by reason)."""
    p = problem.lower()
    if "nan" in p or "inf" in p:
        return "nan_or_inf"
    if "exceeds the bound" in p:
        return "force_bound"
    if "closer than" in p:
        return "atoms_too_close"
    if "shape" in p:
        return "shape_mismatch"
    if "no atoms" in p:
        return "no_atoms"
    if "atomic number" in p:
        return "invalid_atomic_numbers"
    if "charge" in p:
        return "invalid_charge"
    return "invalid"


def _file_signature(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _location(conf: Conformation | None) -> str:
    """Where a record sits inside its file beyond its index (HDF5 group, archive member...)."""
    info = getattr(conf, "info", None) or {}
    return " ".join(f"{k}={info[k]}" for k in _LOCATION_KEYS if k in info)


def _csv_line(row: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


def build_store(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    format: str | None = None,
    max_force: float | None = None,
    min_distance: float = MIN_DISTANCE,
    dedup: bool = True,
    shard_size: int = 100_000,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    report_limit: int = 1000,
    reader: Reader | None = None,
    read_kwargs: dict | None = None,
    select: dict[str, Any] | None = None,
    exclude: dict[str, Any] | None = None,
) -> dict:
    """Read, check, dedup and store every record of ``inputs`` into the store ``out``.

    Args:
        inputs: data files (any format :func:`forcecentric.data.read` accepts).
        out: the store directory.
        format: format name passed to ``read`` (None: guessed per file).
        max_force: drop records with a force component above this bound (eV/Angstrom).
        min_distance: drop records with two atoms closer than this (Angstrom).
        dedup: drop records whose atomic numbers, charge and positions (to 1e-5 Angstrom)
            equal those of a record already stored.
        shard_size: conformations per shard.
        progress: show a tqdm progress bar.
        resume: continue a killed build of ``out`` (inputs already consumed are skipped; new
            inputs may be added). Without it an existing store is an error unless ``overwrite``.
        overwrite: replace an existing store.
        report_limit: dropped records listed in ``build_report.json`` (all are in
            ``dropped.csv``).
        reader: ``reader(path) -> iterable of Conformation`` replacing ``read`` (tests,
            benchmarks, custom sources); records are still checked here.
        read_kwargs: extra keyword arguments for ``read``.
        select: store only the records that have every ``key: value`` (``mol_id``, ``source``,
            ``level_of_theory``, ``equilibrium``, ``charge`` or an ``info`` key such as the
            labeller's ``sampling``; see :func:`~forcecentric.data.conformation.matches`).
        exclude: leave out the records that have every ``key: value`` of it, e.g.
            ``{"sampling": "normal_mode"}`` keeps a labelled corpus's minima and MD frames.
            Records left out by ``select`` or ``exclude`` are counted under ``not_selected``, not
            listed as dropped.

    Returns:
        The report also written to ``out/build_report.json``.

    A file that cannot be read (missing, malformed) does not stop the build: it is listed under
    ``errors`` in the report with the number of records read before the failure, and a resumed
    build tries it again from there.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    options = {
        "format": format,
        "max_force": None if max_force is None else float(max_force),
        "min_distance": float(min_distance),
        "dedup": bool(dedup),
    }
    for name, given in (("select", select), ("exclude", exclude)):
        if given:  # only when given, so that stores built before these options still resume
            if not isinstance(given, dict) or not all(isinstance(k, str) and k for k in given):
                raise DataError(f"{name} must map record keys to values, got {given!r}")
            options[name] = {k: str(v) for k, v in sorted(given.items())}
    if max_force is not None and not (math.isfinite(max_force) and max_force > 0):
        raise DataError(f"max_force must be a positive number, got {max_force}")

    if overwrite and (out / MANIFEST).exists():
        for name in (REPORT, DROPPED):
            (out / name).unlink(missing_ok=True)
    resumed = resume and not overwrite and (out / MANIFEST).exists()
    if resumed:
        previous = (read_manifest(out).get("progress") or {}).get("options")
        if previous is not None and previous != options:
            raise DataError(
                f"cannot resume with different options {options}: the store was built with {previous}",
                file=str(out),
            )
    writer = StoreWriter(
        out,
        shard_size=shard_size,
        resume=resume,
        overwrite=overwrite,
        dedup=dedup,
        metadata={"builder": "forcecentric.data.build.build_store"},
    )
    state = writer.progress
    state["options"] = options
    state.setdefault("inputs", {})
    counts = state.setdefault("counts", {"read": 0, "kept": 0, "dropped": 0, "by_reason": {}})
    counts.setdefault("not_selected", 0)

    # dropped.csv: truncated to what the complete shards account for, then appended to
    dpath = out / DROPPED
    csv_bytes = int(state.get("dropped_csv_bytes", 0))
    if csv_bytes and dpath.exists() and dpath.stat().st_size >= csv_bytes:
        os.truncate(dpath, csv_bytes)
        dropped_fh = open(dpath, "a", encoding="utf-8", newline="")
    else:
        if csv_bytes:
            raise DataError(
                f"{DROPPED} is shorter than the manifest records ({csv_bytes} bytes); cannot resume",
                file=str(dpath),
            )
        dropped_fh = open(dpath, "w", encoding="utf-8", newline="")
        dropped_fh.write(_csv_line(_CSV_HEADER))
        dropped_fh.flush()
        state["dropped_csv_bytes"] = dropped_fh.tell()

    if reader is None:
        from . import read

        kwargs = dict(read_kwargs or {})

        def reader(path: str) -> Iterable[Conformation]:
            return read(path, format=format, validate=False, **kwargs)

    bar = tqdm(desc=f"building {out.name}", unit="conf", disable=not progress, dynamic_ncols=True)
    n_this_run = 0

    def drop(entry: dict, given: str, record: int, conf, category: str, reason: str) -> None:
        entry["dropped"] += 1
        if category == "duplicate":
            entry["duplicates"] += 1
        counts["dropped"] += 1
        counts["by_reason"][category] = counts["by_reason"].get(category, 0) + 1
        dropped_fh.write(_csv_line([given, record, _location(conf), category, reason]))
        dropped_fh.flush()
        state["dropped_csv_bytes"] = dropped_fh.tell()

    def keep(entry: dict, given: str, record: int, conf) -> None:
        """Check ``conf`` and store it, or drop it with the reason."""
        problem = None
        try:
            conf.validate(file=given, record=record, min_distance=min_distance, max_force=max_force)
        except DataError as exc:
            problem = (classify_problem(exc.problem), exc.problem)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            problem = ("invalid", f"{type(exc).__name__}: {exc}")
        if problem is None:
            try:
                # writes the previous shard first when it is full: the progress saved
                # with it is still the one before this record (see StoreWriter)
                if writer.add(conf, checked=True):
                    entry["kept"] += 1
                    counts["kept"] += 1
                else:
                    problem = ("duplicate", "duplicate of a stored conformation "
                               "(same z, charge and positions to 1e-5 A)")
            except DataError as exc:  # a value the store cannot hold (charge range)
                problem = (classify_problem(exc.problem), exc.problem)
        if problem is not None:
            drop(entry, given, record, conf, *problem)

    try:
        for given in inputs:
            given = str(given)
            key = os.path.abspath(given)
            sig = _file_signature(given)
            entry = state["inputs"].get(key)
            if entry is not None and entry.get("consumed", 0) and entry.get("signature") != sig:
                raise DataError(
                    "input changed since the interrupted build started (size or modification time "
                    "differ); cannot resume safely — rebuild with overwrite=True",
                    file=given,
                )
            if entry is None:
                entry = state["inputs"][key] = {
                    "path": given, "consumed": 0, "kept": 0, "dropped": 0, "duplicates": 0,
                    "done": False, "error": None, "signature": sig,
                }
            if entry.get("done"):
                continue
            skip = int(entry["consumed"])
            entry["error"] = None
            bar.set_postfix_str(Path(given).name, refresh=False)
            i = -1
            try:
                for i, conf in enumerate(reader(given)):
                    if i < skip:
                        continue
                    if (select and not matches(conf, select)) or (exclude and matches(conf, exclude)):
                        counts["not_selected"] += 1
                    else:
                        keep(entry, given, i, conf)
                    entry["consumed"] = i + 1
                    counts["read"] += 1
                    n_this_run += 1
                    bar.update(1)
            except DataError as exc:
                # the file itself cannot be read further: report it, go on with the next one
                entry["error"] = {"record": entry["consumed"], "reason": str(exc)}
                continue
            entry["done"] = True
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        dropped_fh.close()

    elapsed = time.perf_counter() - t0
    report = _report(out, writer, state, inputs, resumed, elapsed, n_this_run, report_limit)
    atomic_write_json(out / REPORT, report)
    return report


def _report(out: Path, writer: StoreWriter, state: dict, inputs, resumed: bool, elapsed: float,
            n_this_run: int, limit: int) -> dict:
    manifest = read_manifest(out)
    counts = state["counts"]
    dropped: list[dict] = []
    truncated = False
    with open(out / DROPPED, encoding="utf-8", newline="") as fh:
        rows = csv.DictReader(fh)
        for row in rows:
            if len(dropped) >= limit:
                truncated = True
                break
            rec = row["record"]
            item = {"file": row["file"], "record": int(rec) if rec else None,
                    "category": row["category"], "reason": row["reason"]}
            if row.get("location"):
                item["location"] = row["location"]
            dropped.append(item)
    per_input = {}
    errors = []
    for entry in state["inputs"].values():
        per_input[entry["path"]] = {k: entry[k] for k in ("consumed", "kept", "dropped", "duplicates", "done")}
        if entry.get("error"):
            errors.append({"file": entry["path"], **entry["error"]})
    return {
        "store": str(out),
        "complete": bool(manifest.get("complete")) and not errors,
        "resumed": resumed,
        "inputs": [str(p) for p in inputs],
        "options": state["options"],
        "n_read": counts["read"],
        "n_kept": counts["kept"],
        "n_dropped": counts["dropped"],
        "n_not_selected": counts.get("not_selected", 0),
        "dropped_by_reason": dict(sorted(counts["by_reason"].items())),
        "per_input": per_input,
        "errors": errors,
        "dropped": dropped,
        "dropped_listed": len(dropped),
        "dropped_truncated": truncated,
        "dropped_csv": DROPPED,
        "n_conformations": manifest["n_conformations"],
        "n_shards": manifest["n_shards"],
        "bytes": manifest["bytes"],
        "elapsed_s": round(elapsed, 3),
        "records_per_s_this_run": round(n_this_run / elapsed, 1) if elapsed > 0 else None,
        "statistics": manifest["statistics"],
    }
