"""The speed benchmark's plumbing: a worker row for our ET, ratios, the table (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

speed = pytest.importorskip("speed")


@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_worker_row_for_our_et(tmp_path, variant):
    mols = [{"name": "water", "numbers": [8, 1, 1],
             "positions": [[0.0, 0.0, 0.119], [0.0, 0.763, -0.477], [0.0, -0.763, -0.477]]}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(mols))
    res = subprocess.run([sys.executable, str(BENCH / "speed_worker.py"), "--model", "forcecentric-et", "--size",
                          "demo", "--variant", variant, "--molecules", str(path), "--threads", "1", "--repeats", "2", "--budget-s", "0",
                          "--warmup", "1", "--batch", "4", "--md-steps", "5"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line[4:]) for line in res.stdout.splitlines() if line.startswith("ROW ")]
    # the row, then the same row again with the force check, run after every reading
    assert len(rows) == 2 and "force_max_abs_dev_vs_eager_fp64" not in rows[0]
    row = rows[1]
    assert {k: v for k, v in row.items() if k != "force_max_abs_dev_vs_eager_fp64"} == rows[0]
    assert row["error"] is None, row.get("traceback")
    assert row["variant"] == variant and row["settings"]["variant"] == variant
    assert row["model"] == "forcecentric-et" and row["n_atoms"] == 3 and row["num_parameters"] == 207617
    assert row["latency_ms_median"] > 0 and row["throughput_structures_per_s"] > 0 and row["md_steps_per_s"] > 0
    assert row["peak_rss_mb"] > 0
    assert 0 <= row["force_max_abs_dev_vs_eager_fp64"] < 1e-4  # the variant's forces are the plain path's


def test_molecules_file_is_written_once_then_read(tmp_path, monkeypatch):
    made = [{"name": "water", "numbers": [8, 1, 1], "positions": [[0.0, 0.0, 0.1], [0.0, 0.8, -0.5], [0.0, -0.8, -0.5]]}]
    monkeypatch.setattr(speed, "molecules", lambda: made)
    path = tmp_path / "mols.json"
    assert speed.load_or_make_molecules(path) == made and json.loads(path.read_text()) == made
    monkeypatch.setattr(speed, "molecules", lambda: pytest.fail("regenerated instead of read"))
    assert speed.load_or_make_molecules(path) == made
    path.write_text(json.dumps([{"name": "bad", "numbers": [1, 1], "positions": [[0, 0, 0]]}]))
    with pytest.raises(SystemExit, match="record 0"):
        speed.load_or_make_molecules(path)


def test_ratios_and_table_mark_errors():
    rows = [
        {"model": "forcecentric-et", "variant": "eager", "size": "paper", "molecule": "m", "n_atoms": 9,
         "latency_ms_median": 10.0, "num_parameters": 5, "error": None},
        {"model": "forcecentric-et", "variant": "compiled", "size": "paper", "molecule": "m", "n_atoms": 9,
         "latency_ms_median": 5.0, "num_parameters": 5, "error": None},
        {"model": "nequip", "variant": "eager", "size": "paper", "molecule": "m", "n_atoms": 9,
         "latency_ms_median": 40.0, "num_parameters": 7, "error": None},
        {"model": "mace", "variant": "eager", "size": "paper", "molecule": "m", "n_atoms": 9,
         "latency_ms_median": None, "error": "ImportError: no mace"},
    ]
    speed.add_ratios(rows)
    assert [r["ratio_to_ours"] for r in rows] == [2.0, 1.0, 8.0, None]
    meta = {"run_id": "x", "machine": {"device": "cpu"}, "threads": 2, "dtype": "float32"}
    table = speed.markdown(rows, meta)
    assert "| nequip | paper | 7 | 40.0 (8.00×) |" in table
    assert "| mace | paper |  | error |" in table and "ImportError: no mace" in table
    combined = speed.combine([rows[:1], [dict(rows[0], latency_ms_median=14.0)]])
    assert combined[0]["latency_ms_median"] == 12.0 and combined[0]["passes"] == 2


WATER = {"name": "water", "numbers": [8, 1, 1],
         "positions": [[0.0, 0.0, 0.119], [0.0, 0.763, -0.477], [0.0, -0.763, -0.477]]}


def test_flop_count_is_the_energy_and_forces_call_without_weight_gradients():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from forcecentric.config import ModelConfig
    from forcecentric.nn.model import ForceField

    counted = speed.flop_counts([WATER], "demo")["water"]
    # independently: frozen weights, so .backward() computes the position gradient only
    model = ForceField(ModelConfig(**speed_worker_sizes()["demo"])).eval().requires_grad_(False)
    pos = torch.tensor(WATER["positions"], requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(torch.tensor(WATER["numbers"]), pos, compute_forces=False)["energy"].sum().backward()
    assert counted == counter.get_total_flops() > 0
    # the weight gradients (which an energy + forces call does not compute) would add more
    model.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(torch.tensor(WATER["numbers"]), pos, compute_forces=False)["energy"].sum().backward()
    assert counter.get_total_flops() > counted


def test_recount_flops_rewrites_only_the_flop_fields(tmp_path):
    rows = [{"model": "forcecentric-et", "variant": "fused", "size": "demo", "molecule": "water", "n_atoms": 3,
             "latency_ms_median": 2.0, "ratio_to_ours": 1.0, "num_parameters": 5, "error": None, "run_id": "r", "threads": 2,
             "dtype": "float32", "machine": {"device": "cpu"}, "gemm_gflops": 100.0, "matmul_gflop": 99.0},
            {"model": "nequip", "variant": "eager", "size": "paper", "molecule": "water", "n_atoms": 3,
             "latency_ms_median": 4.0, "ratio_to_ours": 2.0, "num_parameters": 7, "error": None, "run_id": "r", "threads": 2,
             "dtype": "float32", "machine": {"device": "cpu"}, "gemm_gflops": 100.0}]
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(rows))
    mols = tmp_path / "molecules.json"
    mols.write_text(json.dumps([WATER]))
    speed.recount_flops(path, tmp_path / "plot.png", mols)
    new = json.loads(path.read_text())
    flops = speed.flop_counts([WATER], "demo")["water"]
    assert new[0]["matmul_gflop"] == round(flops / 1e9, 4)
    assert new[0]["flop_bound_ms"] == round(flops / 1e11 * 1e3, 3)
    assert new[0]["over_flop_bound"] == round(2.0 / new[0]["flop_bound_ms"], 2)
    assert "matmul_gflop" not in new[1] and new[1]["latency_ms_median"] == 4.0
    assert (tmp_path / "speed.md").exists() and (tmp_path / "plot.png").exists()


def speed_worker_sizes():
    from speed_worker import SIZES

    return SIZES


def test_profile_replays_exactly_the_counted_matrix_products():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from forcecentric.config import ModelConfig
    from forcecentric.nn.model import ForceField

    speed_profile = pytest.importorskip("speed_profile")
    model = ForceField(ModelConfig(**speed_worker_sizes()["demo"])).eval()
    z = torch.tensor(WATER["numbers"])
    pos = torch.tensor(WATER["positions"])
    calls = speed_profile.record_matmuls(model, z, pos, None)
    # the products the replay times are the ones the FLOP bound counts
    assert len(calls) > 0
    with FlopCounterMode(display=False) as counter:
        for func, operands in speed_profile.replay_operands(calls):
            func(*operands)
    assert counter.get_total_flops() == speed.flop_counts([WATER], "demo")["water"]
    assert speed_profile.matmul_replay_ms(calls) > 0


def test_filter_benchmark_times_the_layers_real_filters_three_ways():
    import torch

    from forcecentric.config import ModelConfig
    from forcecentric.nn.model import ForceField

    speed_filters = pytest.importorskip("speed_filters")
    torch.manual_seed(0)
    model = ForceField(ModelConfig(**speed_worker_sizes()["demo"])).eval()
    z = torch.tensor(WATER["numbers"])
    pos = torch.tensor(WATER["positions"])
    seen = []
    handle = model.representation.distance_expansion.register_forward_hook(lambda m, i, out: seen.append(out))
    model(z, pos)
    handle.remove()
    # the radial basis the benchmark feeds the filters is the one the attention layers read
    rbf = speed_filters.attention_rbf(model, z, pos, None)
    torch.testing.assert_close(rbf, seen[0].detach())
    assert rbf.shape == (6 + 3, model.config.num_rbf)  # 6 directed pairs and 3 self loops
    fns = speed_filters.variants(model)
    assert set(fns) == {"per_layer", "stacked", "stacked_strided", "per_layer_saved_sigmoid"}
    leaf = rbf.clone().requires_grad_(True)
    ref = [layer.act(layer.filter_proj(leaf)) for layer in model.representation.layers]
    grads = [torch.randn_like(r) for r in ref]
    ref_grad, = torch.autograd.grad(ref, [leaf], grads)
    for name, fn in fns.items():
        leaf = rbf.clone().requires_grad_(True)
        got = fn(leaf)
        assert len(got) == len(ref), name
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
        # and the same backward to the radial basis, which the forces need
        torch.testing.assert_close(torch.autograd.grad(got, [leaf], grads)[0], ref_grad)
        if name == "stacked":
            assert all(part.is_contiguous() for part in got)


def test_filter_benchmark_whole_call_ab_covers_the_eager_path(tmp_path):
    """speed_filters.py --whole-call-only --paths fused,eager: the energy + forces call timed with
    the filters per pair and per edge on both paths, the same forces, no filter variants."""
    out = tmp_path / "sf.json"
    res = subprocess.run([sys.executable, str(BENCH / "speed_filters.py"), "--molecules", "ethanol", "--size", "demo",
                          "--paths", "fused,eager", "--whole-call-only", "--call-rounds", "2", "--call-repeats", "1",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["paths"] == ["fused", "eager"] and doc["whole_call_only"]
    (row,) = doc["molecules"]
    assert set(row["median_ms"]) == {f"whole_call_{p}_{k}_filters" for p in ("fused", "eager") for k in ("pair", "edge")}
    assert all(len(v) == 2 for v in row["rounds_ms"].values())
    dev = row["max_abs_deviation_from_per_layer"]
    assert set(dev) == {"whole_call_forces_pair_vs_edge", "whole_call_forces_pair_vs_edge_eager"}
    assert all(v < 1e-4 for v in dev.values())
    assert row["edge_filters_over_pair_filters_whole_call_eager"] > 0 and row["per_layer_over_stacked"] is None
    bad = subprocess.run([sys.executable, str(BENCH / "speed_filters.py"), "--paths", "gpu"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "--paths" in bad.stderr


def test_stack_benchmark_times_the_paths_side_by_side_and_splits_the_call(tmp_path):
    """speed_stack.py: the fused call as whole C++ pieces, with the layers alone in one call, per
    layer and eager: the same forces, alternating rounds, the ratios to the first path, and the
    first path's time inside and outside the C++ calls."""
    out = tmp_path / "ss.json"
    res = subprocess.run([sys.executable, str(BENCH / "speed_stack.py"), "--molecules", "ethanol", "--size", "demo",
                          "--paths", "whole,stack_only,per_layer,eager", "--rounds", "2", "--repeats", "2",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["n_atoms"] == 9 and set(row["ms_median"]) == {"whole", "stack_only", "per_layer", "eager"}
    assert all(len(v) == 2 for v in row["ms_rounds"].values())
    dev = row["max_abs_force_deviation_from_whole"]
    assert set(dev) == {"stack_only", "per_layer", "eager"} and all(v < 1e-4 for v in dev.values())
    assert set(row["over_whole"]) == set(dev) and all(v > 0 for v in row["over_whole"].values())
    split = row["split"]
    assert split["path"] == "whole" and 0 < split["inside_cpp_ms_mean"] < split["call_ms_mean"]
    assert "machine" in doc and "versions" in doc
    bad = subprocess.run([sys.executable, str(BENCH / "speed_stack.py"), "--paths", "gpu"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "paths" in bad.stderr


def test_train_step_benchmark_times_both_filter_layouts_on_real_batches(tmp_path):
    """benchmarks/train_step.py: the preset's objective on batches of the bundled corpus, the same
    loss and gradients with the filters per pair and per edge, both timed; a JSON with the ratio."""
    out = tmp_path / "train_step.json"
    res = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--sizes", "demo", "--batches", "1",
                          "--rounds", "2", "--repeats", "1", "--threads", "1", "--out", str(out),
                          "--plot", str(tmp_path / "train_step.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "train_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert row["preset"] == "demo_pretrain" and row["model"]["hidden_channels"] == 64
    assert row["batches"] == 1 and len(row["atoms_per_batch"]) == 1 and row["atoms_per_batch"][0] > row["batch_size"]
    assert row["edges_with_self_loops_first_batch"] >= 256  # so the model pairs the filters
    assert set(row["median_ms_per_step"]) == {"pair_filters", "edge_filters"}
    assert all(len(v) == 2 and min(v) > 0 for v in row["rounds_ms_per_step"].values())
    assert row["edge_over_pair"] > 0
    assert row["relative_deviation"]["loss"] < 1e-6 and row["relative_deviation"]["max_gradient"] < 1e-4
    assert doc["machine"]["cpu_count"] >= 1 and doc["versions"]["torch"]
    assert set(doc["malloc_env"]) >= {"GLIBC_TUNABLES", "LD_PRELOAD"}  # the allocator's settings, recorded
