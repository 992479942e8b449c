"""PNG plots people look at: learning curves and parity plots (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _write_png(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _mae_unit(key: str) -> str:
    """Unit of a logged ``stage/NAME_mae`` column: eV/A for forces, eV for energies, the report
    unit for property targets (``val/gap_mae`` is in meV)."""
    from .nn.properties import TARGETS

    name = key.split("/")[-1][: -len("_mae")]
    if name in TARGETS:
        return TARGETS[name].report_unit
    return "eV/A" if "force" in name else "eV"


def learning_curve(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """Plot the per-epoch train / val loss terms and MAEs logged by Lightning's CSV logger."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if epoch in (None, ""):
            continue
        for key, value in row.items():
            if not value or key in ("epoch", "step") or key.endswith("_step"):
                continue
            if not (key.startswith("val/") or key.endswith("_epoch") or key == "lr-AdamW"):
                continue
            try:
                series.setdefault(key.replace("_epoch", ""), []).append((float(epoch), float(value)))
            except ValueError:
                continue
    if not series:
        return None
    loss_keys = sorted(k for k in series if k.split("/")[-1] in ("loss", "force", "zero_force", "denoise", "energy"))
    mae_keys = sorted(k for k in series if k.endswith("_mae"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        xs, ys = zip(*series[key])
        if any(y > 0 for y in ys):
            axes[0].plot(xs, ys, label=key, ls="-" if key.startswith("train") else "--")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss term")
    axes[0].legend(fontsize=7)
    axes[0].set_title("loss terms")
    for key in mae_keys:
        xs, ys = zip(*series[key])
        axes[1].plot(xs, ys, marker=".", label=f"{key} ({_mae_unit(key)})")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation MAE")
    if mae_keys:
        axes[1].legend(fontsize=7)
    return _write_png(fig, Path(out_png))


def _parity_panel(ax, ref: np.ndarray, pred: np.ndarray, what: str, name: str, unit: str, size: float,
                  factor: float = 1000.0) -> None:
    ax.scatter(ref, pred, s=size, alpha=0.4)
    lim = [float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))]
    ax.plot(lim, lim, "k--", lw=0.8)
    if math.isfinite(lim[0]) and lim[1] > lim[0]:
        ax.set_xlim(lim)
        ax.set_ylim(lim)
    ax.set_xlabel(f"reference {what}")
    ax.set_ylabel("predicted")
    ax.set_title(f"{name}  MAE {factor * float(np.abs(ref - pred).mean()):.3g} {unit}")


def parity(
    ref_f: np.ndarray,
    pred_f: np.ndarray,
    ref_e: np.ndarray | None,
    pred_e: np.ndarray | None,
    out_png: str | Path,
    title: str = "",
) -> Path:
    """Predicted vs reference force components (and per-atom-count energies when given)."""
    n = 2 if ref_e is not None and len(ref_e) else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.5))
    axes = np.atleast_1d(axes)
    _parity_panel(axes[0], ref_f.ravel(), pred_f.ravel(), "force component (eV/A)", "forces", "meV/A", 2)
    if n == 2:
        ref_e, pred_e = np.asarray(ref_e, dtype=float), np.asarray(pred_e, dtype=float)
        mean = float(ref_e.mean())  # shift so the ticks stay readable for totals of ~1e3-1e4 eV
        _parity_panel(axes[1], ref_e - mean, pred_e - mean, f"energy - ({mean:.2f} eV)", "energy", "meV", 6)
    if title:
        fig.suptitle(title)
    return _write_png(fig, Path(out_png))


def property_parity(
    ref: dict[str, np.ndarray],
    pred: dict[str, np.ndarray],
    units: dict[str, tuple[str, str, float]],
    out_png: str | Path,
    title: str = "",
) -> Path:
    """One predicted-vs-reference panel per property; ``units[name] = (data unit, report unit,
    factor)`` labels the axes in the data unit and the MAE in the report unit."""
    names = list(ref)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        unit, report_unit, factor = units[name]
        _parity_panel(ax, np.asarray(ref[name], float), np.asarray(pred[name], float), f"{name} ({unit})",
                      name, report_unit, 8, factor)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _write_png(fig, Path(out_png))


def md_stable_times(table: list[dict], protocol: dict, out_png: str | Path) -> Path:
    """Grouped bars: mean stable time (± std over seeds) per model, one group per molecule."""
    molecules = list(dict.fromkeys(r["molecule"] for r in table))
    models = list(dict.fromkeys(r["model"] for r in table))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(molecules) * max(1, len(models) / 2), 3.6))
    x = np.arange(len(molecules))
    for k, model in enumerate(models):
        rows = {r["molecule"]: r for r in table if r["model"] == model}
        mean = [rows[m]["stable_time_ps_mean"] if m in rows else np.nan for m in molecules]
        std = [rows[m]["stable_time_ps_std"] if m in rows else 0.0 for m in molecules]
        ax.bar(x + (k - (len(models) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=model)
    total = protocol["steps"] * protocol["timestep_fs"] * 1e-3
    ax.axhline(total, color="k", lw=0.8, ls="--", label=f"run length ({total:g} ps)")
    ax.set_xticks(x, molecules)
    ax.set_ylabel("stable time (ps)")
    ax.set_title(f"MD stability, {protocol['ensemble']} {protocol['temperature']:g} K, {protocol['timestep_fs']:g} fs",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _write_png(fig, Path(out_png))


def md_hr_curves(curves: dict[str, list | None], r_max: float, molecule: str, out_png: str | Path) -> Path:
    """h(r) of each model (pooled over seeds, stable frames only) against the reference's."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, h in curves.items():
        if h is None:
            continue
        h = np.asarray(h)
        r = (np.arange(len(h)) + 0.5) * r_max / len(h)
        ref = name == "reference"
        ax.plot(r, h, color="k" if ref else None, lw=2.0 if ref else 1.0, alpha=1.0 if ref else 0.8,
                label=name)
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("h(r) (1/Å)")
    ax.set_title(f"{molecule}: interatomic distance distribution", fontsize=9)
    ax.legend(fontsize=7)
    return _write_png(fig, Path(out_png))


def md_energy_traces(traces: dict[str, tuple[list, list]], molecule: str, out_png: str | Path) -> Path:
    """Potential energy against time, one line per model (first seed) and the reference run."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, (t, e) in traces.items():
        e = np.asarray(e, dtype=float)
        if len(e):
            ax.plot(t, e - e[0], lw=0.8, label=name)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("E_pot - E_pot(0) (eV)")
    ax.set_title(f"{molecule}: potential energy along MD", fontsize=9)
    ax.legend(fontsize=7)
    return _write_png(fig, Path(out_png))


def study_learning_curves(summary: list[dict], title: str, out_png: str | Path) -> Path:
    """Test force MAE against training-set size, log-log, one line per model (mean ± std)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    models = {}  # model -> its setting; "none" marks the from-scratch models
    for s in summary:
        models.setdefault(s["model"], s["setting"])
    for model, setting in models.items():
        pts = sorted((s["n_train"], s["force_mae_mean"], s["force_mae_std"]) for s in summary if s["model"] == model)
        n, m, e = (np.array(x, dtype=float) for x in zip(*pts))
        style = dict(ls="--", color="black") if setting == "none" else {}
        ax.errorbar(n, m, yerr=e, marker="o", ms=4, capsize=2, label=model, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning conformations N")
    ax.set_ylabel("test force MAE (meV/Å)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _write_png(fig, Path(out_png))


def study_bars(summary: list[dict], title: str, out_png: str | Path) -> Path:
    """Test force MAE of several pre-training variants at one N (mean ± std over seeds), as bars."""
    labels = [s["label"] for s in summary]
    means = [s["force_mae_mean"] for s in summary]
    stds = [s["force_mae_std"] for s in summary]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(labels) + 1.5), 4.2))
    colors = ["0.4" if s["setting"] == "none" else "C0" if s["setting"] == "unseen" else "C1" for s in summary]
    ax.bar(range(len(labels)), means, yerr=stds, color=colors, capsize=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test force MAE (meV/Å)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _write_png(fig, Path(out_png))
