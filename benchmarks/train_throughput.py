"""Training throughput (conformations per second) of one process against 2 DDP processes.

Each measurement is a real ``forcecentric pretrain`` run (the preset's objective: force matching,
zero-force regularization and denoising) on the bundled corpus store, stopped after ``--steps``
optimizer steps. A callback on rank 0 stamps the start of every step; the throughput is the
global batch over the median step time, after ``--skip`` warm-up steps (the mean rate over the
same steps is recorded too). Modes, all at the same global batch:

* ``1proc_2threads``: one process, torch using both cores (what a plain run does here);
* ``1proc_1thread``: one process on one core (the per-core baseline);
* ``2proc_ddp``: ``torchrun --nproc_per_node 2``, gloo, one thread each, half the batch each.

2 processes against 1 thread measures DDP's scaling (ideal: 2x); against 2 threads it says
what to use on a CPU node. Run on a quiet machine::

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json

and writes the bars to ``docs/figures/train_throughput.png`` (``--plot-only`` redraws them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"1proc_2threads": (1, 2), "1proc_1thread": (1, 1), "2proc_ddp": (2, 1)}
SIZES = {"demo": "demo_pretrain", "paper": "pretrain"}  # F=64 L=3 (the study's), F=128 L=6


def _overrides(run_dir: str, steps: int, batch: int, world: int, accelerator: str = "cpu") -> dict:
    return {
        "run_dir": run_dir, "data.batch_size": batch, "data.n_val": 64, "data.n_test": 0, "data.n_train": None,
        "data.num_workers": 0, "trainer.max_steps": steps, "trainer.max_epochs": 1000,
        "trainer.max_time_minutes": None, "trainer.early_stopping_patience": None, "trainer.progress_bar": False,
        "trainer.checkpoint_every_n_steps": None, "trainer.checkpoint_every_minutes": None,
        "trainer.accelerator": accelerator, "trainer.devices": world, "trainer.strategy": "ddp" if world > 1 else "auto",
    }


def worker(args: argparse.Namespace) -> None:
    """One training run (under torchrun: one rank of it) with step time stamps."""
    import lightning.pytorch as pl

    from forcecentric.config import load_run_config, preset_path
    from forcecentric.train import run as run_module

    class Stamps(pl.Callback):
        def __init__(self):
            self.t: list[float] = []
            self.atoms: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t.append(time.perf_counter())
            self.atoms.append(int(batch.z.shape[0]))

        def on_train_end(self, trainer, pl_module):
            self.t.append(time.perf_counter())
            if trainer.is_global_zero:
                Path(args.stamps).write_text(json.dumps({"t": self.t, "atoms": self.atoms}))

    stamps = Stamps()
    original = run_module._trainer

    def trainer(cfg, run_dir):
        t = original(cfg, run_dir)
        t.callbacks.append(stamps)
        return t

    run_module._trainer = trainer
    cfg = load_run_config(preset_path(args.config), _overrides(args.run_dir, args.steps, args.batch, args.world,
                                                                  args.accelerator))
    run_module.run(cfg)


def measure(size: str, mode: str, steps: int, global_batch: int, skip: int, tmp: Path,
            accelerator: str = "cpu") -> dict:
    world, threads = MODES[mode]
    batch = global_batch // world
    run_dir = tmp / f"{size}_{mode}"
    stamps = tmp / f"{size}_{mode}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    me = [str(Path(__file__).resolve()), "--worker", "--config", SIZES[size], "--run-dir", str(run_dir),
          "--steps", str(steps), "--batch", str(batch), "--world", str(world), "--stamps", str(stamps),
          "--accelerator", accelerator]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *me]
    else:
        cmd = [sys.executable, *me]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{size}/{mode} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(stamps.read_text())
    t = data["t"]
    dts = [b - a for a, b in zip(t[skip:-1], t[skip + 1:])]
    median = statistics.median(dts)
    timed_steps = len(dts)
    return {
        "size": size, "mode": mode, "processes": world, "threads_per_process": threads,
        "batch_per_process": batch, "global_batch": batch * world, "steps": steps, "timed_steps": timed_steps,
        "median_step_s": median, "conformations_per_s_median": batch * world / median,
        "conformations_per_s_mean": batch * world * timed_steps / (t[-1] - t[skip]),
        "mean_atoms_per_conformation_rank0": sum(data["atoms"][skip:]) / (batch * len(data["atoms"][skip:])),
        "process_wall_s": round(wall, 1),
    }


def plot(doc: dict, out_png: str | Path) -> Path:
    """Bars of conformations/s per mode, one group per model size."""
    import matplotlib.pyplot as plt

    from forcecentric.plots import _write_png

    sizes = list(dict.fromkeys(r["size"] for r in doc["results"]))
    modes = list(dict.fromkeys(r["mode"] for r in doc["results"]))
    labels = {"1proc_2threads": "1 process, 2 threads", "1proc_1thread": "1 process, 1 thread",
              "2proc_ddp": "2 DDP processes, 1 thread each"}
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6))
    axes = [axes] if len(sizes) == 1 else list(axes)
    for ax, size in zip(axes, sizes):
        rows = {r["mode"]: r for r in doc["results"] if r["size"] == size}
        vals = [rows[m]["conformations_per_s_median"] if m in rows else 0.0 for m in modes]
        ax.bar(range(len(modes)), vals, color=["C0", "0.6", "C1"][: len(modes)])
        for k, v in enumerate(vals):
            ax.text(k, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels([labels.get(m, m) for m in modes], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("training conformations / s (median)")
        ax.set_title(f"{size} ET, global batch {doc['settings']['global_batch']}")
        ax.grid(True, axis="y", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(f"pretrain throughput, {m.get('gpu') or m['cpu']} ({m['usable_cores']} cores)", fontsize=9)
    return _write_png(fig, Path(out_png))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="demo_pretrain", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--stamps", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help="(worker) batch per process")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--accelerator", default="cpu",
                    help="cpu, or gpu: then the modes mean 1 GPU / 2 GPUs (NCCL); the thread counts only "
                    "limit the host side")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "figures" / "train_throughput.png"))
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from the JSON in --out")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.plot_only:
        print("wrote", plot(json.loads(Path(args.out).read_text()), args.plot))
        return

    from forcecentric.provenance import machine_info

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for mode in args.modes:
                r = measure(size, mode, args.steps, args.global_batch, args.skip, Path(tmp), args.accelerator)
                results.append(r)
                print(f"{size:6s} {mode:15s} {r['conformations_per_s_median']:8.1f} conf/s "
                      f"(median step {r['median_step_s'] * 1e3:.0f} ms, batch {r['global_batch']})", flush=True)
    for size in args.sizes:
        by = {r["mode"]: r["conformations_per_s_median"] for r in results if r["size"] == size}
        if "2proc_ddp" in by:
            for base in ("1proc_1thread", "1proc_2threads"):
                if base in by:
                    print(f"{size}: 2 processes / {base} = {by['2proc_ddp'] / by[base]:.2f}x")
    out = {
        "benchmark": "training throughput, 1 process vs 2 DDP processes (gloo)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info("cuda" if args.accelerator == "gpu" else "cpu"),
        "settings": {"accelerator": args.accelerator, "steps": args.steps, "skip": args.skip, "global_batch": args.global_batch,
                     "data": "bundled:corpus store (GFN2-xTB, 2-40 atoms)", "presets": SIZES,
                     "objective": "the preset's: force matching + zero-force + denoising",
                     "rate": "global batch / median step time (rank 0's step stamps); mean rate also given"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("wrote", args.out, plot(out, args.plot))


if __name__ == "__main__":
    main()
