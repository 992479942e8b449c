"""Where the time of one energy + forces call goes (our ET, one molecule, CPU or CUDA).

    python benchmarks/speed_profile.py [--molecule 3BPA] [--size paper] [--threads 2]

Times the phases of a call separately (neighbour search, energy forward, force backward) and
lists the operators by self time (torch.profiler): eager, through the fused C++ CPU kernels
(``model.use_fused_kernels()``) and compiled. Also sets the matrix products' own time beside
the FLOP bound (matmul FLOPs of the call / the measured 1024 x 1024 GEMM rate, as in
``speed.py``): what the products cost at the rate the library reaches on the model's small
shapes, against what they would cost at its best rate. Writes
benchmarks/results/speed_profile.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import MOLECULES, embed, flop_counts, gemm_gflops  # noqa: E402
from speed_worker import SIZES  # noqa: E402

from forcecentric.config import ModelConfig  # noqa: E402
from forcecentric.evaluation import write_json  # noqa: E402
from forcecentric.nn.model import ForceField  # noqa: E402
from forcecentric.provenance import machine_info, versions  # noqa: E402


def median_ms(fn, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(times), 3)


def phases(model: ForceField, z, pos, batch) -> dict[str, float]:
    edges = model._radius_graph(pos, batch)

    def forward():
        p = pos.detach().requires_grad_(True)
        return p, model._energy(z, p, batch, 1, edges)["energy"]

    def both():
        p, e = forward()
        torch.autograd.grad([e.sum()], [p])

    with torch.no_grad():
        t_nl = median_ms(lambda: model._radius_graph(pos, batch))
    t_fwd = median_ms(forward)
    t_both = median_ms(both)
    t_call = median_ms(lambda: model(z, pos, batch))
    return {"neighbour_search_ms": t_nl, "energy_forward_ms": t_fwd, "force_backward_ms": round(t_both - t_fwd, 3),
            "whole_call_ms": t_call, "edges": int(edges.shape[1])}


def top_ops(model, z, pos, batch, n: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        model(z, pos, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            model(z, pos, batch)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3),
             "calls_per_call": e.count // 20} for e in rows[:n]]


class _RecordMatmuls(TorchDispatchMode):
    """Records the matrix products of a call: operator, and shape and strides of each operand."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.calls.append((func, [(tuple(a.shape), tuple(a.stride()), a.dtype) for a in args
                                      if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def record_matmuls(model, z, pos, batch) -> list[tuple]:
    """``(operator, [(shape, strides, dtype) of each tensor operand])`` of every matrix product
    of one energy + forces call, in order."""
    model(z, pos, batch)
    recorder = _RecordMatmuls()
    with recorder:
        model(z, pos, batch)
    return recorder.calls


def replay_operands(calls: list[tuple]) -> list[tuple]:
    """``(operator, fresh operands)`` of recorded products: same shapes, strides and dtypes."""
    return [(func, [torch.empty_strided(shape, stride, dtype=dtype).normal_() for shape, stride, dtype in ops])
            for func, ops in calls]


def matmul_replay_ms(calls: list[tuple]) -> float:
    """The recorded products replayed on their own (same shapes, strides and order, fresh
    operands): their time at the rate the library reaches on these shapes, without the rest of
    the model. Median ms."""
    replay = replay_operands(calls)

    def run():
        for func, operands in replay:
            func(*operands)

    return median_ms(run, repeats=50)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="3BPA", choices=list(MOLECULES))
    p.add_argument("--size", default="paper", choices=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "speed_profile.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    numbers, positions = embed(MOLECULES[args.molecule])
    z = torch.tensor(numbers)
    pos = torch.tensor(positions, dtype=torch.float32)
    batch = torch.zeros(len(z), dtype=torch.long)
    torch.manual_seed(0)
    model = ForceField(ModelConfig(**SIZES[args.size])).eval()
    result = {"molecule": args.molecule, "n_atoms": len(numbers), "size": SIZES[args.size], "threads": args.threads,
              "machine": machine_info("cpu"), "versions": versions()}
    gflop = flop_counts([{"name": args.molecule, "numbers": numbers, "positions": positions}], args.size)
    rate = gemm_gflops(args.threads, "cpu")
    bound_ms = gflop[args.molecule] / (rate * 1e9) * 1e3
    result.update(matmul_gflop=round(gflop[args.molecule] / 1e9, 4), gemm_gflops=round(rate, 1),
                  flop_bound_ms=round(bound_ms, 3))

    def measure(replay: bool = True) -> dict:
        out = {**phases(model, z, pos, batch), "top_ops": top_ops(model, z, pos, batch)}
        # the products alone, at the rate the library reaches on these shapes, against the bound
        # (not under torch.compile: recording would change what is compiled)
        out["whole_call_over_flop_bound"] = round(out["whole_call_ms"] / bound_ms, 2)
        if replay:
            calls = record_matmuls(model, z, pos, batch)
            out["matmul_ms"], out["matmul_calls"] = matmul_replay_ms(calls), len(calls)
            out["matmul_over_flop_bound"] = round(out["matmul_ms"] / bound_ms, 2)
            out["matmul_gflops_achieved"] = round(gflop[args.molecule] / (out["matmul_ms"] * 1e6), 1)
        return out

    result["eager"] = measure()
    model.use_fused_kernels(True)
    result["fused"] = measure()
    model.use_fused_kernels(False)
    model.compile_inference()
    t = time.perf_counter()
    model(z, pos, batch)
    result["compile_s"] = round(time.perf_counter() - t, 1)
    result["compiled"] = measure(replay=False)
    write_json(result, args.out)
    for kind in ("eager", "fused", "compiled"):
        r = result.get(kind)
        if r is None:
            continue
        print(f"{kind}: search {r['neighbour_search_ms']} ms, forward {r['energy_forward_ms']} ms, "
              f"backward {r['force_backward_ms']} ms, whole call {r['whole_call_ms']} ms "
              f"({r['whole_call_over_flop_bound']}x the FLOP bound)")
        if "matmul_ms" in r:
            print(f"   its {r['matmul_calls']} matrix products on their own: {r['matmul_ms']} ms "
                  f"({r['matmul_over_flop_bound']}x the bound, {r['matmul_gflops_achieved']} GFLOP/s)")
        for op in r["top_ops"][:8]:
            print(f"   {op['self_cpu_share']:6.1%}  {op['op']}  ({op['calls_per_call']} calls)")
    print(f"FLOP bound {result['flop_bound_ms']} ms ({result['matmul_gflop']} GFLOP at {result['gemm_gflops']} "
          f"GFLOP/s); compile: {result['compile_s']} s; results: {args.out}")


if __name__ == "__main__":
    main()
