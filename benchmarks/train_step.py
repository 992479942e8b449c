"""One training step with the distance filters once per atom pair, against once per directed edge.

    python benchmarks/train_step.py [--sizes paper,demo] [--threads 2] [--batches 4]

A training step computes the forces with their graph kept (``create_graph``), then the loss's
gradient goes back through that graph: a second derivative of every operation of the ET's eager
path (the fused kernels are inference only). The layers' distance filters ``act(rbf W^T + b)``
are ``[E, 4F]`` tensors, the largest per-edge ones, and their second derivative is a dozen
elementwise passes over them per layer. ``i <- j`` and ``j <- i`` share their distance, so the
model computes the filters once per atom pair (``representation.pair_filters``, on a CPU, from
``pair_filters_min_edges`` edges up). This script times one step both ways, side by side in one
process: the preset's objective (``pretrain``: force matching, zero-force regularization,
denoising) on batches of the preset's size drawn from the bundled GFN2-xTB corpus, forward and
backward; the optimizer's update, the same both ways, is left out. Rounds alternate the order
of the variants; the figures are medians. Before timing it checks that both ways give the same
loss and parameter gradients. Writes ``benchmarks/results/train_step.json`` and
``docs/figures/train_step.png`` (``--plot-only`` redraws it), with the
allocator's environment (``GLIBC_TUNABLES``, ``LD_PRELOAD``, ...): on Linux, glibc gives large
freed blocks back to the kernel and every step faults them in again, which the README's
``GLIBC_TUNABLES`` setting avoids (``benchmarks/results/train_step_malloc.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed_profile import median_ms  # noqa: E402

from forcecentric.config import load_run_config, preset_path  # noqa: E402
from forcecentric.data.dataset import collate  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.nn.model import ForceField  # noqa: E402
from forcecentric.objectives import make_views, total_loss  # noqa: E402
from forcecentric.provenance import machine_info, versions  # noqa: E402
from forcecentric.train.datamodule import open_source  # noqa: E402

PRESETS = {"paper": "pretrain", "demo": "demo_pretrain"}  # F=128 L=6, F=64 L=3
VARIANTS = {"pair_filters": True, "edge_filters": False}
# the allocator's settings change a step's time (freed blocks returned to the kernel are faulted
# in again): recorded with the results
MALLOC_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def batches(spec: str, n: int, size: int, seed: int) -> list:
    """``n`` batches of ``size`` conformations drawn at random (without replacement) from ``spec``."""
    ds = open_source(spec)
    if n * size > len(ds):
        raise SystemExit(f"{spec} has {len(ds)} conformations, fewer than {n} x {size}")
    idx = np.random.default_rng(seed).choice(len(ds), n * size, replace=False)
    return [collate([ds[int(i)] for i in idx[k * size:(k + 1) * size]]) for k in range(n)]


def step_fn(model: ForceField, loss_cfg, batch, seed: int):
    """One forward and backward of the training loss on ``batch``; returns the loss."""
    def step():
        model.zero_grad(set_to_none=True)
        views = make_views(batch, loss_cfg, torch.Generator().manual_seed(seed))
        b = views.batch
        out = model(b.z, b.pos, b.batch, b.n_graphs, compute_forces=True, create_graph=True)
        loss = total_loss(out, views, loss_cfg)["loss"]
        loss.backward()
        return loss.detach()
    return step


def measure(size: str, args) -> dict:
    cfg = load_run_config(preset_path(PRESETS[size]))
    torch.manual_seed(0)
    model = ForceField(cfg.model).train()
    rep = model.representation
    data = batches(args.data, args.batches, cfg.data.batch_size, args.seed)
    steps = [step_fn(model, cfg.loss, b, args.seed + k) for k, b in enumerate(data)]

    def run(variant: str):
        rep.pair_filters = VARIANTS[variant]
        return [s() for s in steps]

    # the same loss and gradients both ways (to float32 rounding), and the pairs really used
    check = {}
    for variant in VARIANTS:
        rep.pair_filters = VARIANTS[variant]
        loss = steps[0]()
        check[variant] = (loss, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (la, ga), (lb, gb) = check["pair_filters"], check["edge_filters"]
    loss_dev = abs(float(la - lb)) / max(abs(float(lb)), 1e-12)
    grad_dev = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(ga, gb))
    if loss_dev > 1e-4 or grad_dev > 1e-3:
        raise SystemExit(f"{size}: pair filters change the loss by {loss_dev:.1e} or a gradient by {grad_dev:.1e} "
                         "(relative)")
    b0 = data[0]
    edges = int(model._radius_graph(b0.pos, b0.batch).shape[1]) + int(b0.z.shape[0])

    rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for k in range(args.rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            rounds[name].append(median_ms(lambda: run(name), repeats=args.repeats, warmup=1) / len(steps))
    rep.pair_filters = True
    median = {name: round(statistics.median(v), 1) for name, v in rounds.items()}
    atoms = [int(b.z.shape[0]) for b in data]
    result = {
        "size": size, "preset": PRESETS[size], "model": {k: getattr(cfg.model, k) for k in
                                                         ("hidden_channels", "num_layers", "num_heads", "num_rbf",
                                                          "cutoff")},
        "batch_size": cfg.data.batch_size, "batches": len(data), "atoms_per_batch": atoms,
        "edges_with_self_loops_first_batch": edges, "median_ms_per_step": median, "rounds_ms_per_step": rounds,
        "edge_over_pair": round(median["edge_filters"] / median["pair_filters"], 3),
        "relative_deviation": {"loss": loss_dev, "max_gradient": grad_dev},
        "conformations_per_s": {name: round(cfg.data.batch_size / (ms / 1000), 1) for name, ms in median.items()},
    }
    print(f"{size} ET, batch {cfg.data.batch_size} ({statistics.mean(atoms):.0f} atoms, first batch {edges} edges "
          f"with self loops): per step {median['pair_filters']:.1f} ms with pair filters, "
          f"{median['edge_filters']:.1f} ms with edge filters ({result['edge_over_pair']}x); "
          f"loss deviation {loss_dev:.1e}, gradients {grad_dev:.1e}")
    return result


def plot(doc: dict, out_png: str | Path) -> Path:
    """Training conformations per second, filters per edge and per pair, one group per size; each
    round's rate as a dot over its bar."""
    import matplotlib.pyplot as plt

    from forcecentric.plots import _write_png

    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(1.9 + 1.9 * len(rows), 3.6))
    for k, row in enumerate(rows):
        for s, (name, label, color) in enumerate((("edge_filters", "filters per directed edge", "0.6"),
                                                  ("pair_filters", "filters per atom pair", "C0"))):
            x = k + (s - 0.5) * 0.38
            rate = row["conformations_per_s"][name]
            ax.bar(x, rate, width=0.36, color=color, label=label if k == 0 else None)
            ax.plot([x] * len(row["rounds_ms_per_step"][name]),
                    [row["batch_size"] / (ms / 1000) for ms in row["rounds_ms_per_step"][name]], "k.", ms=3)
            ax.text(x, rate, f"{rate:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['size']} ET (F={r['model']['hidden_channels']}, {r['model']['num_layers']} layers)\n"
                        f"batch {r['batch_size']}: {r['edge_over_pair']}x" for r in rows], fontsize=8)
    ax.set_ylabel("training conformations / s (median)")
    ax.grid(True, axis="y", alpha=0.3)
    top = max(max(r["conformations_per_s"].values()) for r in rows)
    ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left")
    m = doc["machine"]
    ax.set_title(f"one training step, {m['cpu']}, {doc['threads']} threads", fontsize=9)
    return _write_png(fig, Path(out_png))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="paper,demo", help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--data", default="bundled:corpus", help="a store or file to draw the batches from")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, each timed once per call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="calls (each over every batch) per timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    p.add_argument("--plot", default=str(HERE.parent / "docs" / "figures" / "train_step.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw --plot from the JSON in --out")
    args = p.parse_args()
    if args.plot_only:
        print("wrote", plot(json.loads(Path(args.out).read_text()), args.plot))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {list(PRESETS)}")
    torch.set_num_threads(args.threads)
    result = {"benchmark": "one training step (forward + double backward), distance filters per atom pair "
                           "vs per directed edge",
              "data": args.data, "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
              "seed": args.seed, "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
              "results": [measure(s, args) for s in sizes],
              "machine": machine_info("cpu"), "versions": versions()}
    write_json(result, args.out)
    print(f"results: {args.out}, plot: {plot(result, args.plot)}")


if __name__ == "__main__":
    main()
