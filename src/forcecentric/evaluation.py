"""Evaluate a model on conformations: energy and force errors, per element, and a parity plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase.data import chemical_symbols

from .data.conformation import Conformation
from .data.dataset import collate
from .errors import ElementError


def unknown_elements(known, z) -> str | None:
    """A message naming the elements of ``z`` outside ``known`` (None when all are known or
    ``known`` is empty, i.e. the model records no element set)."""
    known = set(known or [])
    unknown = sorted({int(x) for x in np.unique(z)} - known) if known else []
    if not unknown:
        return None
    return (
        f"element(s) {[chemical_symbols[u] for u in unknown]} the model was not trained on "
        f"(it knows {[chemical_symbols[e] for e in sorted(known)]})"
    )


def check_elements(model, records: Sequence[Conformation], file: str | None = None) -> None:
    """Raise :class:`ElementError` when a record holds an element the model was not trained on."""
    known = getattr(model, "elements", None)
    for i, r in enumerate(records):
        problem = unknown_elements(known, r.z)
        if problem:
            where = (f"file {file!r}, " if file else "") + f"record {i}"
            raise ElementError(f"{where}: {problem}")


def batches(model, records: Sequence[Conformation], batch_size: int):
    """``records`` collated ``batch_size`` at a time, in the model's device and dtype."""
    param = next(model.parameters())
    for start in range(0, len(records), batch_size):
        yield collate(records[start : start + batch_size]).to(param.device, param.dtype)


def predict(model, records: Sequence[Conformation], batch_size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV) and forces (eV/A) of ``records`` in the model's device and dtype; a force
    field on a CPU runs through the fused kernels for the call (when they build)."""
    was_training = model.training
    model.eval()
    switch_fused = getattr(model, "uses_fused_kernels", True) is False and next(model.parameters()).device.type == "cpu"
    if switch_fused:
        from .nn.kernels import use_fused_if_available

        use_fused_if_available(model)
    energies: list[np.ndarray] = []
    forces: list[np.ndarray] = []
    try:
        for b in batches(model, records, batch_size):
            out = model(b.z, b.pos, b.batch, b.n_graphs, compute_forces=True)
            energies.append(out["energy"].detach().double().cpu().numpy())
            f = out["forces"].detach().double().cpu().numpy()
            forces.extend(np.split(f, np.cumsum(b.n_atoms.cpu().numpy())[:-1]))
    finally:
        model.train(was_training)
        if switch_fused:
            model.use_fused_kernels(False)
    return np.concatenate(energies), forces


def error_metrics(
    records: Sequence[Conformation], energies: np.ndarray, forces: Sequence[np.ndarray]
) -> dict:
    """Energy MAE/RMSE (per molecule and per atom), force MAE/RMSE, cosine similarity, per element."""
    out: dict = {"n_conformations": len(records)}
    e_idx = [i for i, r in enumerate(records) if r.energy is not None]
    if e_idx:
        ref = np.array([records[i].energy for i in e_idx])
        pred = energies[e_idx]
        n = np.array([records[i].n_atoms for i in e_idx])
        err = pred - ref
        out.update(
            energy_mae=float(np.abs(err).mean()),
            energy_rmse=float(np.sqrt((err**2).mean())),
            energy_mae_per_atom=float(np.abs(err / n).mean()),
            n_with_energy=len(e_idx),
        )
    f_idx = [i for i, r in enumerate(records) if r.forces is not None]
    if f_idx:
        ref = np.concatenate([records[i].forces for i in f_idx])
        pred = np.concatenate([forces[i] for i in f_idx])
        z = np.concatenate([records[i].z for i in f_idx])
        diff = pred - ref
        nr, npd = np.linalg.norm(ref, axis=1), np.linalg.norm(pred, axis=1)
        ok = (nr > 1e-6) & (npd > 1e-6)
        cos = (ref[ok] * pred[ok]).sum(1) / (nr[ok] * npd[ok])
        out.update(
            force_mae=float(np.abs(diff).mean()),
            force_rmse=float(np.sqrt((diff**2).mean())),
            force_cos=float(cos.mean()) if ok.any() else float("nan"),
            force_mae_per_element={
                chemical_symbols[int(e)]: float(np.abs(diff[z == e]).mean()) for e in np.unique(z)
            },
            n_with_forces=len(f_idx),
        )
    return out


def evaluate(
    model,
    records: Sequence[Conformation],
    out_dir: str | Path | None = None,
    name: str = "test",
    file: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Metrics of ``model`` on ``records``; with ``out_dir``, also ``{name}_metrics.json`` and a
    ``{name}_parity.png`` plot. Units: eV, eV/atom, eV/A."""
    check_elements(model, records, file)
    energies, forces = predict(model, records, batch_size)
    metrics = error_metrics(records, energies, forces)
    metrics["units"] = {"energy": "eV", "energy_per_atom": "eV/atom", "forces": "eV/A"}
    if out_dir is not None:
        from .plots import parity

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        f_idx = [i for i, r in enumerate(records) if r.forces is not None]
        e_idx = [i for i, r in enumerate(records) if r.energy is not None]
        if f_idx:
            parity(
                np.concatenate([records[i].forces for i in f_idx]),
                np.concatenate([forces[i] for i in f_idx]),
                np.array([records[i].energy for i in e_idx]) if e_idx else None,
                energies[e_idx] if e_idx else None,
                out_dir / f"{name}_parity.png",
                title=name,
            )
        write_json(metrics, out_dir / f"{name}_metrics.json")
    return metrics


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    tmp.replace(path)
    return path


@torch.no_grad()
def fit_atomrefs(model, records: Sequence[Conformation], batch_size: int = 64) -> dict[int, float]:
    """Least-squares per-element energies of the residual ``E_ref - E_model`` on ``records``.

    Used before fine-tuning: pre-training sees forces only, so the energy offset of each element
    is fitted on the fine-tuning set. With a single composition the minimum-norm solution
    reproduces the mean residual exactly.
    """
    recs = [r for r in records if r.energy is not None]
    if not recs:
        return {}
    pred, _ = predict(model, recs, batch_size)
    resid = np.array([r.energy for r in recs]) - pred
    elements = sorted({int(z) for r in recs for z in np.unique(r.z)})
    col = {z: k for k, z in enumerate(elements)}
    A = np.zeros((len(recs), len(elements)))
    for i, r in enumerate(recs):
        for zz, c in zip(*np.unique(r.z, return_counts=True)):
            A[i, col[int(zz)]] = c
    coef, *_ = np.linalg.lstsq(A, resid, rcond=None)
    return {z: float(coef[col[z]]) for z in elements}
