"""Would one matrix product for every layer's distance filters be faster than one per layer?

    python benchmarks/speed_filters.py [--molecules ethanol,3BPA,deca-alanine] [--size paper] [--threads 2]

Each attention layer of the ET turns the same radial basis ``rbf [E, K]`` into its activated
distance filters ``act(rbf W_l^T + b_l) [E, 4F]``. The six products of the paper-size ET could be
one (the layers' weights stacked: ``[E, K] x [K, 6 * 4F]``), with one activation over the
result and one product back to ``rbf`` in the force backward instead of six. This script times,
side by side in one process, on the model's real radial basis of each molecule (every directed
edge and the self loops, as the layers see it), the filters' forward and their backward to
``rbf``:

* ``per_layer``: each layer's ``filter_proj`` and activation, as the model computes them;
* ``stacked``: one product and one activation, then each layer's slice made contiguous (the
  fused kernel reads the filters as a dense ``[E, 4F]`` block);
* ``stacked_strided``: the same without the copies, a lower bound for a kernel that read a
  strided slice;
* ``per_layer_saved_sigmoid`` (SiLU models): per layer, with an activation that keeps its
  sigmoid for the backward instead of computing it again.

It also times the per-layer path's four parts on their own (the products forward and back, the
activation and its backward), summed over the layers.

Then it times the whole energy + forces call of the fused model, alone and in more rounds, two
ways: with the filters computed once per atom pair (``i <- j`` and ``j <- i`` share their
distance; what the model does from ``representation.pair_filters_min_edges`` edges up) and once
per directed edge (the model before 2026-12-07, and below that size now); ``--paths
fused,eager`` times the eager path's call too (it pairs the filters by the same rule), and
``--whole-call-only`` skips the filter variants. Rounds alternate the order of the variants; the
figures are medians. ``water-cluster`` (speed.py's 1,029 atoms) is
slow: time it with ``--molecules water-cluster --rounds 2 --repeats 3 --call-rounds 4
--call-repeats 3``. Writes benchmarks/results/speed_filters.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import MOLECULES, WATER, named_structure  # noqa: E402
from speed_profile import median_ms  # noqa: E402
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


def measure(molecule: str, args) -> dict:
    """Every timing of one molecule, side by side."""
    numbers, positions = named_structure(molecule)
    z = torch.tensor(numbers)
    pos = torch.tensor(positions, dtype=torch.float32)
    batch = torch.zeros(len(z), dtype=torch.long)
    torch.manual_seed(0)
    model = ForceField(ModelConfig(**SIZES[args.size])).eval().requires_grad_(False)
    model.use_fused_kernels(True)
    rbf0 = attention_rbf(model, z, pos, batch)
    fns = {} if args.whole_call_only else variants(model)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(rbf0.shape[0], layer.filter_proj.out_features, generator=gen)
             for layer in model.representation.layers]

    def filters(fn):
        rbf = rbf0.clone().requires_grad_(True)
        outs = fn(rbf)
        torch.autograd.backward(outs, grads)
        return outs, rbf.grad

    deviation = {}
    if fns:
        ref_out, ref_grad = filters(fns["per_layer"])
    for name, fn in fns.items():
        out, grad = filters(fn)
        deviation[name] = max([(a - b).abs().max().item() for a, b in zip(out, ref_out)]
                              + [(grad - ref_grad).abs().max().item()])
        if deviation[name] > 1e-4:
            raise SystemExit(f"{name} differs from the per-layer filters by {deviation[name]:.2e}")

    jobs = {name: (lambda fn=fn: filters(fn)) for name, fn in fns.items()}
    if "per_layer_saved_sigmoid" in fns:
        jobs.update(parts(model, rbf0, grads))
    rounds: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for k in range(args.rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            rounds[name].append(median_ms(jobs[name], repeats=args.repeats, warmup=3))

    # the whole call, filters per atom pair or per directed edge, alone and in more rounds: the
    # difference is a few per cent for small molecules
    rep = model.representation
    saved = rep.pair_filters, rep.pair_filters_min_edges

    def whole_call(pair_filters: bool, fused: bool):
        rep.pair_filters, rep.pair_filters_min_edges = pair_filters, 0
        model.use_fused_kernels(fused)
        return lambda: model(z, pos, batch)

    calls = {f"whole_call_{path}_{kind}_filters": (kind == "pair", path == "fused")
             for path in args.paths for kind in ("pair", "edge")}
    forces = {name: whole_call(*flags)()["forces"] for name, flags in calls.items()}
    for path in args.paths:
        key = "whole_call_forces_pair_vs_edge" + ("" if path == "fused" else f"_{path}")
        deviation[key] = (forces[f"whole_call_{path}_pair_filters"]
                          - forces[f"whole_call_{path}_edge_filters"]).abs().max().item()
        if deviation[key] > 1e-4:
            raise SystemExit(f"{molecule} ({path}): forces with pair filters differ from per-edge filters by "
                             f"{deviation[key]:.2e} eV/Å")
    for name in calls:
        rounds[name] = []
    for k in range(args.call_rounds):
        for name in (list(calls) if k % 2 == 0 else list(calls)[::-1]):
            fn = whole_call(*calls[name])
            rounds[name].append(median_ms(fn, repeats=args.call_repeats, warmup=3))
    rep.pair_filters, rep.pair_filters_min_edges = saved
    model.use_fused_kernels(True)
    median = {name: round(statistics.median(v), 3) for name, v in rounds.items()}

    def ratio(a: str, b: str):
        return round(median[a] / median[b], 3) if a in median and b in median else None

    result = {
        "molecule": molecule, "n_atoms": len(numbers), "edges_with_self_loops": int(rbf0.shape[0]),
        "median_ms": median, "rounds_ms": rounds, "max_abs_deviation_from_per_layer": deviation,
        "filters_share_of_whole_call_with_edge_filters": ratio("per_layer", "whole_call_fused_edge_filters"),
        "edge_filters_over_pair_filters_whole_call": ratio("whole_call_fused_edge_filters",
                                                           "whole_call_fused_pair_filters"),
        "edge_filters_over_pair_filters_whole_call_eager": ratio("whole_call_eager_edge_filters",
                                                                 "whole_call_eager_pair_filters"),
        "per_layer_over_stacked": ratio("per_layer", "stacked"),
        "per_layer_over_stacked_strided": ratio("per_layer", "stacked_strided"),
        "per_layer_over_saved_sigmoid": ratio("per_layer", "per_layer_saved_sigmoid"),
    }
    print(f"{molecule} ({len(numbers)} atoms, {rbf0.shape[0]} edges with self loops):")
    for name, ms in median.items():
        print(f"  {name:32s} {ms:9.3f} ms")
    print("  " + "; ".join(f"{k}: {v}" for k, v in result.items() if k.startswith(("edge_", "per_layer_", "filters_"))
                           and v is not None))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecules", default="ethanol,3BPA,deca-alanine",
                   help=f"comma-separated, from {', '.join([*MOLECULES, WATER])}")
    p.add_argument("--size", default="paper", choices=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30, help="calls per timing of the filters")
    p.add_argument("--call-rounds", type=int, default=8, help="rounds of the whole-call A/B")
    p.add_argument("--call-repeats", type=int, default=30, help="calls per timing of the whole call")
    p.add_argument("--paths", default="fused", help="the whole-call A/B's paths: fused, eager or both")
    p.add_argument("--whole-call-only", action="store_true", help="only the whole-call A/B, not the filter variants")
    p.add_argument("--out", default=str(HERE / "results" / "speed_filters.json"))
    args = p.parse_args()
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if not args.paths or set(args.paths) - {"fused", "eager"}:
        raise SystemExit(f"--paths: choose from fused, eager (got {args.paths})")
    molecules = [m.strip() for m in args.molecules.split(",") if m.strip()]
    unknown = [m for m in molecules if m not in MOLECULES and m != WATER]
    if unknown:
        raise SystemExit(f"unknown molecule(s) {unknown}; choose from {[*MOLECULES, WATER]}")
    torch.set_num_threads(args.threads)
    result = {"size": SIZES[args.size], "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
              "call_rounds": args.call_rounds, "call_repeats": args.call_repeats, "paths": args.paths,
              "whole_call_only": args.whole_call_only,
              "molecules": [measure(m, args) for m in molecules],
              "machine": machine_info("cpu"), "versions": versions()}
    write_json(result, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
