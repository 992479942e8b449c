"""Would one matrix product for every layer's distance filters be faster than one per layer?

    python benchmarks/speed_filters.py [--molecule 3BPA] [--size paper] [--threads 2] [--rounds 5]

Each attention layer of the ET turns the same radial basis ``rbf [E, K]`` into its activated
distance filters ``act(rbf W_l^T + b_l) [E, 4F]``. The six products of the paper-size ET could be
one (the layers' weights stacked: ``[E, K] x [K, 6 * 4F]``), with one activation over the
result and one product back to ``rbf`` in the force backward instead of six. This script times,
side by side in one process, on the model's real radial basis of one molecule (self loops
included, as the layers see it), the filters' forward and their backward to ``rbf``:

* ``per_layer``: what the model does now (each layer's ``filter_proj`` and activation);
* ``stacked``: one product and one activation, then each layer's slice made contiguous (the
  fused kernel reads the filters as a dense ``[E, 4F]`` block);
* ``stacked_strided``: the same without the copies, a lower bound for a kernel that read a
  strided slice;
* ``per_layer_saved_sigmoid`` (SiLU models): per layer, with an activation that keeps its
  sigmoid for the backward instead of computing it again.

It also times the per-layer path's four parts on their own (the products forward and back, the
activation and its backward), summed over the layers.

Beside them it times the whole energy + forces call of the fused model, for the filters' share.
Rounds alternate the order of the variants; the figures are medians. Writes
benchmarks/results/speed_filters.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import MOLECULES, embed  # noqa: E402
from speed_worker import SIZES  # noqa: E402

from forcecentric.config import ModelConfig  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.nn.model import ForceField  # noqa: E402
from forcecentric.provenance import machine_info, versions  # noqa: E402


def attention_rbf(model: ForceField, z, pos, batch) -> torch.Tensor:
    """The radial basis the attention layers read: real edges, then one self loop per atom."""
    rep = model.representation
    idx_i, idx_j = model._radius_graph(pos, batch)
    r = torch.linalg.vector_norm(pos[idx_j] - pos[idx_i], dim=-1)
    with torch.no_grad():
        return rep.distance_expansion(torch.cat([r, r.new_zeros(len(z))]))


def variants(model: ForceField) -> dict:
    layers = model.representation.layers
    act = layers[0].act
    width = layers[0].filter_proj.out_features
    weight = torch.cat([layer.filter_proj.weight for layer in layers]).detach()
    bias = torch.cat([layer.filter_proj.bias for layer in layers]).detach()

    def per_layer(rbf):
        return [layer.act(layer.filter_proj(rbf)) for layer in layers]

    def stacked(rbf):
        return [part.contiguous() for part in act(torch.addmm(bias, rbf, weight.t())).split(width, dim=1)]

    def stacked_strided(rbf):
        return list(act(torch.addmm(bias, rbf, weight.t())).split(width, dim=1))

    out = {"per_layer": per_layer, "stacked": stacked, "stacked_strided": stacked_strided}
    if isinstance(act, torch.nn.SiLU):
        out["per_layer_saved_sigmoid"] = lambda rbf: [_SiLUSavedSigmoid.apply(layer.filter_proj(rbf))
                                                     for layer in layers]
    return out


class _SiLUSavedSigmoid(torch.autograd.Function):
    """SiLU that keeps ``sigmoid(x)`` and ``x sigmoid(x)`` for its backward."""

    @staticmethod
    def forward(ctx, x):
        sig = torch.sigmoid(x)
        y = x * sig
        ctx.save_for_backward(sig, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        sig, y = ctx.saved_tensors
        return grad * (sig + y * (1 - sig))


def parts(model: ForceField, rbf: torch.Tensor, grads: list[torch.Tensor]) -> dict:
    """The per-layer path's parts as callables, each over all layers."""
    layers = model.representation.layers
    pre = [layer.filter_proj(rbf) for layer in layers]
    act_grads = [torch.ops.aten.silu_backward(g, p) for g, p in zip(grads, pre)]
    return {
        "part_product_forward": lambda: [layer.filter_proj(rbf) for layer in layers],
        "part_activation_forward": lambda: [layer.act(p) for layer, p in zip(layers, pre)],
        "part_activation_backward": lambda: [torch.ops.aten.silu_backward(g, p) for g, p in zip(grads, pre)],
        "part_product_backward": lambda: [g @ layer.filter_proj.weight for g, layer in zip(act_grads, layers)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="3BPA", choices=list(MOLECULES))
    p.add_argument("--size", default="paper", choices=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", default=str(HERE / "results" / "speed_filters.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    numbers, positions = embed(MOLECULES[args.molecule])
    z = torch.tensor(numbers)
    pos = torch.tensor(positions, dtype=torch.float32)
    batch = torch.zeros(len(z), dtype=torch.long)
    torch.manual_seed(0)
    model = ForceField(ModelConfig(**SIZES[args.size])).eval().requires_grad_(False)
    model.use_fused_kernels(True)
    rbf0 = attention_rbf(model, z, pos, batch)
    fns = variants(model)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(rbf0.shape[0], layer.filter_proj.out_features, generator=gen)
             for layer in model.representation.layers]

    def filters(fn):
        rbf = rbf0.clone().requires_grad_(True)
        outs = fn(rbf)
        torch.autograd.backward(outs, grads)
        return outs, rbf.grad

    ref_out, ref_grad = filters(fns["per_layer"])
    deviation = {}
    for name, fn in fns.items():
        out, grad = filters(fn)
        deviation[name] = max([(a - b).abs().max().item() for a, b in zip(out, ref_out)]
                              + [(grad - ref_grad).abs().max().item()])
        if deviation[name] > 1e-4:
            raise SystemExit(f"{name} differs from the per-layer filters by {deviation[name]:.2e}")

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    jobs = {name: (lambda fn=fn: filters(fn)) for name, fn in fns.items()}
    jobs["whole_call_fused"] = lambda: model(z, pos, batch)
    if "per_layer_saved_sigmoid" in fns:
        jobs.update(parts(model, rbf0, grads))
    rounds: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for k in range(args.rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            rounds[name].append(round(timed(jobs[name]), 3))
    median = {name: round(statistics.median(v), 3) for name, v in rounds.items()}
    result = {
        "molecule": args.molecule, "n_atoms": len(numbers), "pairs_with_self_loops": int(rbf0.shape[0]),
        "size": SIZES[args.size], "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
        "median_ms": median, "rounds_ms": rounds, "max_abs_deviation_from_per_layer": deviation,
        "filters_share_of_whole_call": round(median["per_layer"] / median["whole_call_fused"], 3),
        "per_layer_over_stacked": round(median["per_layer"] / median["stacked"], 3),
        "per_layer_over_stacked_strided": round(median["per_layer"] / median["stacked_strided"], 3),
        "per_layer_over_saved_sigmoid": (round(median["per_layer"] / median["per_layer_saved_sigmoid"], 3)
                                         if "per_layer_saved_sigmoid" in median else None),
        "machine": machine_info("cpu"), "versions": versions(),
    }
    write_json(result, args.out)
    for name, ms in median.items():
        print(f"{name:18s} {ms:8.3f} ms")
    print(f"filters (forward + backward to rbf) / whole fused call: {result['filters_share_of_whole_call']:.1%}; "
          f"per_layer / stacked: {result['per_layer_over_stacked']}, per_layer / stacked_strided: "
          f"{result['per_layer_over_stacked_strided']}; results: {args.out}")


if __name__ == "__main__":
    main()
