"""Pre-trained vs scratch on molecular properties (issue #7): single-target fine-tuning runs.

Every cell is one ``forcecentric finetune --task property`` command (printed and stored with its
result), run in worker processes with one thread each; finished cells are skipped and killed
ones resume from their ``last.ckpt``, so the script can be stopped and started again.

Defaults: the bundled GFN2-xTB property set (1,078 corpus minima), targets homo, lumo, gap, mu;
validation 100 and test 300 molecules drawn first for each seed (the same for every size), then
N = 100 and 500 training molecules; the F = 64, 3-layer ET of the pre-training study.

    python benchmarks/property_study.py --pretrained runs/study/pretrain/unseen/full/model.ckpt
    python benchmarks/property_study.py --report        # tables and figure from what has run

Writes ``benchmarks/results/property_study.json`` (every cell, the machine and versions),
``benchmarks/results/property_study.md`` and ``docs/figures/property_study.png`` (with ``--tag T``:
``property_study_T.*``, e.g. for another learning rate in another ``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "figures" / "property_study.png"
MODEL = {"model.hidden_channels": 64, "model.num_layers": 3, "model.num_heads": 4, "model.num_rbf": 32}


def cell_command(args, target: str, n_train: int, init: str, seed: int) -> tuple[list[str], Path]:
    run_dir = Path(args.out) / target / f"n{n_train}" / f"{init}_seed{seed}"
    epochs = args.epochs_small if n_train <= 100 else args.epochs_large
    sets = {**MODEL, "seed": seed, "data.n_train": n_train, "data.n_val": args.n_val, "data.n_test": args.n_test,
            "data.batch_size": args.batch_size, "optim.lr": args.lr, "optim.schedule": "cosine",
            "optim.warmup_steps": 50, "optim.ema_decay": args.ema, "trainer.max_epochs": epochs,
            "trainer.early_stopping_patience": None, "trainer.progress_bar": False}
    cmd = ["forcecentric", "finetune", "--task", "property", "--target", target, "--data", args.data,
           "--run-dir", str(run_dir)]
    if init == "pretrained":
        cmd += ["--from", args.pretrained]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={'null' if v is None else v}"]
    return cmd, run_dir


def run_cell(cmd: list[str], run_dir: Path) -> dict:
    if (run_dir / "metrics.json").is_file():
        return {"run_dir": str(run_dir), "status": "done before"}
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd = cmd + ["--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "stdout.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return {"run_dir": str(run_dir), "status": "ok" if rc == 0 else f"failed (exit {rc}, see stdout.log)",
            "wall_s": round(time.time() - t0, 1)}


def collect(args) -> list[dict]:
    rows = []
    for target in args.targets:
        for n in args.sizes:
            for init in args.inits:
                for seed in args.seeds:
                    cmd, run_dir = cell_command(args, target, n, init, seed)
                    m = run_dir / "metrics.json"
                    if not m.is_file():
                        continue
                    metrics = json.loads(m.read_text())
                    t = metrics["test"]["targets"][target]
                    rows.append({"target": target, "n_train": n, "init": init, "seed": seed,
                                 "test_mae": t["mae"], "unit": t["unit"], "n_test": t["n"],
                                 "val_mae": metrics["val"]["targets"][target]["mae"],
                                 "epochs": metrics["epochs"], "wall_time_s": metrics["wall_time_s"],
                                 "command": shlex.join(cmd)})
    return rows


def mean_baseline(args, target: str, n_train: int, seed: int) -> float:
    """Test MAE (report unit) of predicting the training set's mean, on the same split as the runs."""
    import numpy as np

    from forcecentric.config import DataConfig
    from forcecentric.data.dataset import property_values
    from forcecentric.nn.properties import TARGETS
    from forcecentric.train.datamodule import ForceFieldDataModule

    dm = ForceFieldDataModule(DataConfig(train=[args.data], n_train=n_train, n_val=args.n_val, n_test=args.n_test),
                              seed=seed, properties=[target])
    dm.setup("fit")
    train = property_values([dm.train_set[i] for i in range(len(dm.train_set))], [target])[:, 0]
    test = property_values([dm.test_set[i] for i in range(len(dm.test_set))], [target])[:, 0]
    return float(np.abs(test - train.mean()).mean() * TARGETS[target].report_factor)


def summarize(rows: list[dict], args) -> list[dict]:
    import numpy as np

    out = []
    keys = sorted({(r["target"], r["n_train"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for target, n in keys:
        cell = {"target": target, "n_train": n}
        for init in ("scratch", "pretrained"):
            v = [r["test_mae"] for r in rows if (r["target"], r["n_train"], r["init"]) == (target, n, init)]
            cell[init] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v)} if v else None
            cell["unit"] = next(r["unit"] for r in rows if r["target"] == target)
        if cell["scratch"] and cell["pretrained"]:
            cell["ratio"] = cell["scratch"]["mean"] / cell["pretrained"]["mean"]
        seeds = sorted({r["seed"] for r in rows if (r["target"], r["n_train"]) == (target, n)})
        cell["train_mean_baseline"] = float(np.mean([mean_baseline(args, target, n, s) for s in seeds]))
        out.append(cell)
    return out


def write_report(args, rows: list[dict]) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from forcecentric.provenance import machine_info

    summary = summarize(rows, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"description": "pre-trained vs scratch single-target property fine-tuning, test MAE",
               "data": args.data, "pretrained": args.pretrained, "n_val": args.n_val, "n_test": args.n_test,
               "lr": args.lr, "epochs": {"n<=100": args.epochs_small, "larger": args.epochs_large},
               "model": MODEL, "machine": machine_info(), "summary": summary, "runs": rows}
    name = "property_study" + (f"_{args.tag}" if args.tag else "")
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(RESULTS / f"{name}.json")
    lines = ["| target | N train | training mean | scratch | pre-trained | ratio | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in summary:
        def num(v: float) -> str:
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"

        def fmt(x):
            return f"{num(x['mean'])} ± {num(x['std'])}" if x else "–"
        seeds = "/".join(str(c[i]["seeds"]) if c[i] else "0" for i in ("scratch", "pretrained"))
        ratio = f"{c['ratio']:.2f}×" if "ratio" in c else "–"
        lines.append(f"| {c['target']} ({c['unit']}) | {c['n_train']} | {num(c['train_mean_baseline'])} | "
                     f"{fmt(c['scratch'])} | "
                     f"{fmt(c['pretrained'])} | {ratio} | {seeds} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _figure(summary, FIGURE.with_name(f"{name}.png"))


def _figure(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({c["target"] for c in summary})
    if not targets:
        return
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.6), squeeze=False)
    for ax, target in zip(axes[0], targets):
        cells = [c for c in summary if c["target"] == target]
        for init, color in (("scratch", "tab:gray"), ("pretrained", "tab:blue")):
            pts = [(c["n_train"], c[init]) for c in cells if c[init]]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                            marker="o", capsize=3, color=color, label=init)
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        sizes = sorted({c["n_train"] for c in cells})
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training molecules")
        ax.set_ylabel(f"test MAE ({cells[0]['unit']})")
        ax.set_title(target)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="bundled:xtb_properties")
    p.add_argument("--pretrained", default="runs/study/pretrain/unseen/full/model.ckpt")
    p.add_argument("--targets", nargs="+", default=["homo", "lumo", "gap", "mu"])
    p.add_argument("--sizes", nargs="+", type=int, default=[100, 500])
    p.add_argument("--inits", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the weights (default off)")
    p.add_argument("--epochs-small", type=int, default=150, help="epochs at N <= 100")
    p.add_argument("--epochs-large", type=int, default=80, help="epochs at larger N")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/property_study")
    p.add_argument("--tag", default="", help="suffix of the result files (property_study_TAG.json/.md/.png)")
    p.add_argument("--report", action="store_true", help="only collect finished cells into the report")
    args = p.parse_args()
    if not args.report:
        if "pretrained" in args.inits and not Path(args.pretrained).is_file():
            p.error(f"--pretrained {args.pretrained!r} does not exist (make it with `forcecentric study -c study "
                    "--phase pretrain` or pass another checkpoint of the same model size)")
        cells = [cell_command(args, t, n, i, s) for s in args.seeds for n in args.sizes for t in args.targets
                 for i in args.inits]
        with cf.ProcessPoolExecutor(args.workers) as pool:
            futures = {pool.submit(run_cell, cmd, rd): (cmd, rd) for cmd, rd in cells}
            for fut in cf.as_completed(futures):
                cmd, rd = futures[fut]
                print(json.dumps(fut.result()), flush=True)
    write_report(args, collect(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
