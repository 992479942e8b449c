"""Where the time of one energy + forces call goes (our ET, one molecule, CPU or CUDA).

    python benchmarks/speed_profile.py [--molecule 3BPA] [--size paper] [--threads 2]

Times the phases of a call separately (neighbour search, energy forward, force backward) and
lists the operators by self time (torch.profiler): eager, through the fused C++ CPU kernels
(``model.use_fused_kernels()``) and compiled. Writes
benchmarks/results/speed_profile.json.
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
    result["eager"] = {**phases(model, z, pos, batch), "top_ops": top_ops(model, z, pos, batch)}
    model.use_fused_kernels(True)
    result["fused"] = {**phases(model, z, pos, batch), "top_ops": top_ops(model, z, pos, batch)}
    model.use_fused_kernels(False)
    model.compile_inference()
    t = time.perf_counter()
    model(z, pos, batch)
    result["compile_s"] = round(time.perf_counter() - t, 1)
    result["compiled"] = {**phases(model, z, pos, batch), "top_ops": top_ops(model, z, pos, batch)}
    write_json(result, args.out)
    for kind in ("eager", "fused", "compiled"):
        r = result.get(kind)
        if r is None:
            continue
        print(f"{kind}: search {r['neighbour_search_ms']} ms, forward {r['energy_forward_ms']} ms, "
              f"backward {r['force_backward_ms']} ms, whole call {r['whole_call_ms']} ms")
        for op in r["top_ops"][:8]:
            print(f"   {op['self_cpu_share']:6.1%}  {op['op']}  ({op['calls_per_call']} calls)")
    print(f"compile: {result['compile_s']} s; results: {args.out}")


if __name__ == "__main__":
    main()
