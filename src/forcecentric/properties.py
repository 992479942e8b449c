"""Molecular property prediction: prior fits, predictions, metrics in QM9 units, CSV output.

The model is :class:`~forcecentric.nn.properties.PropertyModel`; the targets and their units are
in :data:`~forcecentric.nn.properties.TARGETS`. Metrics are reported in the units QM9 papers use
(meV for energies, D, a0^3, a0^2, cal/(mol K)) and say so in their ``unit`` field.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .data.conformation import Conformation
from .data.dataset import property_values
from .errors import ConfigError
from .evaluation import batches, check_elements, write_json
from .nn.properties import TARGETS, atom_features

__all__ = [
    "check_targets",
    "fit_priors",
    "predict_properties",
    "property_metrics",
    "evaluate_properties",
    "write_predictions_csv",
]


def check_targets(names: Sequence[str]) -> list[str]:
    """``names`` as a list, or :class:`ConfigError` naming an unknown target and the valid ones."""
    names = list(names)
    if not names:
        raise ConfigError(f"no property target given; valid targets: {', '.join(TARGETS)}")
    for name in names:
        if name not in TARGETS:
            raise ConfigError(f"unknown property target {name!r}; valid targets: {', '.join(TARGETS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"property targets {names} name a target twice")
    return names


@torch.no_grad()
def fit_priors(model, records: Sequence[Conformation], batch_size: int = 256) -> dict[str, dict]:
    """Fit each target's prior on training ``records`` and set ``model.target_std``.

    Targets with per-element references (U0, U, H, G) get a least-squares reference value per
    element; the others one shift. The scale is the spread of what remains, per unit of the
    target's atom features (per atom for sums, per molecule for means, per Bohr^2 for <R^2>).
    Returns what was fitted, per target.
    """
    y = property_values(records, model.targets)
    elements = sorted({int(z) for r in records for z in np.unique(r.z)})
    col = {z: k for k, z in enumerate(elements)}
    fitted: dict[str, dict] = {}
    stds = []
    for k, name in enumerate(model.targets):
        t = TARGETS[name]
        std = float(np.std(y[:, k])) if len(y) > 1 else 0.0
        stds.append(std if std > 1e-12 else 1.0)
        if name not in model.priors:
            fitted[name] = {"target_std": stds[-1]}
            continue
        X = np.zeros((len(records), len(elements)))
        row = 0
        for b in batches(model, records, batch_size):
            phi = atom_features(t.kind, b.z, b.pos, b.batch, b.n_graphs, model.masses).double().cpu().numpy()
            mol = b.batch.cpu().numpy() + row
            cols = np.array([col[int(z)] for z in b.z.cpu().numpy()])
            np.add.at(X, (mol, cols), phi)
            row += b.n_graphs
        per_mol = X.sum(1)
        prior = model.priors[name]
        if t.references:
            # least squares; the minimum-norm solution when compositions do not fix every element
            ref, *_ = np.linalg.lstsq(X, y[:, k], rcond=None)
            fit = X @ ref
            atomref = {z: float(ref[col[z]]) for z in elements}
            shift = 0.0
        else:
            shift = float((per_mol * y[:, k]).sum() / max((per_mol**2).sum(), 1e-300))
            fit = shift * per_mol
            atomref = {}
        resid = (y[:, k] - fit) / np.where(per_mol > 0, per_mol, 1.0)
        scale = float(np.std(resid)) if len(resid) > 1 else 0.0
        if not scale > 1e-12:
            scale = 1.0
        prior.set(scale=scale, shift=shift, atomref=atomref if atomref else torch.zeros_like(prior.atomref))
        fitted[name] = {"scale": scale, "shift": shift, "references": atomref, "target_std": stds[-1]}
    model.target_std.copy_(torch.tensor(stds, dtype=model.target_std.dtype))
    return fitted


@torch.no_grad()
def predict_properties(model, records: Sequence[Conformation], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Predictions of every target of ``model`` for ``records`` (each target's data unit);
    ``dipole`` ``[M, 3]`` (Debye) too when ``mu`` is a target."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for b in batches(model, records, batch_size):
            out = model(b.z, b.pos, b.batch, b.n_graphs, charge=b.charge)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.double().cpu().numpy())
    finally:
        model.train(was_training)
    preds = {k: np.concatenate(v) for k, v in parts.items()}
    for name in model.targets:
        bad = np.flatnonzero(~np.isfinite(preds[name]))
        if len(bad):
            raise FloatingPointError(f"the model predicts a non-finite {name} for records {bad[:10].tolist()}")
    return preds


def property_metrics(ref: np.ndarray, pred: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, dict]:
    """MAE and RMSE per target, in the target's report unit (meV, D, a0^3, a0^2, cal/(mol K))."""
    out = {}
    for k, name in enumerate(names):
        t = TARGETS[name]
        err = (pred[name] - ref[:, k]) * t.report_factor
        out[name] = {
            "mae": float(np.abs(err).mean()),
            "rmse": float(np.sqrt((err**2).mean())),
            "unit": t.report_unit,
            "n": int(len(err)),
        }
    return out


def evaluate_properties(
    model,
    records: Sequence[Conformation],
    out_dir: str | Path | None = None,
    name: str = "test",
    file: str | None = None,
    batch_size: int = 64,
) -> dict:
    """Property errors of ``model`` on ``records``; with ``out_dir`` also ``{name}_metrics.json``
    and ``{name}_parity.png``."""
    check_elements(model, records, file)
    ref = property_values(records, model.targets, file=file)
    pred = predict_properties(model, records, batch_size)
    metrics = {"n_molecules": len(records), "targets": property_metrics(ref, pred, model.targets)}
    if out_dir is not None:
        from .plots import property_parity

        out_dir = Path(out_dir)
        property_parity(
            {n: ref[:, k] for k, n in enumerate(model.targets)},
            {n: pred[n] for n in model.targets},
            {n: (TARGETS[n].unit, TARGETS[n].report_unit, TARGETS[n].report_factor) for n in model.targets},
            out_dir / f"{name}_parity.png",
            title=name,
        )
        write_json(metrics, out_dir / f"{name}_metrics.json")
    return metrics


def write_predictions_csv(
    path: str | Path,
    records: Sequence[Conformation],
    columns: dict[str, np.ndarray],
    units: dict[str, str],
    reference: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write one row per record: ``index, mol_id, formula, n_atoms``, then each predicted column
    named with its unit (``gap_eV``) and, where ``reference`` has it, ``gap_eV_ref`` and
    ``gap_eV_error`` (prediction - reference). Written to a temporary file and renamed, so a
    failed run leaves no half-written CSV."""
    from ase.data import chemical_symbols
    from ase.formula import Formula

    from .data.store import atomic_write_text

    def slug(unit: str) -> str:
        return unit.replace("^", "").replace("/", "_per_").replace("(", "").replace(")", "").replace(" ", "")

    names = list(columns)
    header = ["index", "mol_id", "formula", "n_atoms"]
    for n in names:
        col = f"{n}_{slug(units[n])}"
        header.append(col)
        if reference and n in reference:
            header += [f"{col}_ref", f"{col}_error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i, r in enumerate(records):
        formula = Formula.from_list([chemical_symbols[int(z)] for z in r.z]).format("hill")
        row: list = [i, r.mol_id, formula, r.n_atoms]
        for n in names:
            row.append(f"{float(columns[n][i]):.8g}")
            if reference and n in reference:
                row += [f"{float(reference[n][i]):.8g}", f"{float(columns[n][i] - reference[n][i]):.6g}"]
        w.writerow(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return path
