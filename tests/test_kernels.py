"""The fused CPU kernels (forcecentric.nn.kernels) give the eager ET's energies, forces and
gradients: analytic backward against finite differences, every attention activation, with and
without the vector cutoff, both dtypes, the generic and the specialised head sizes, batches."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

import forcecentric
from forcecentric.nn import ForceField, radius_graph
from forcecentric.nn.et import EquivariantAttention
import forcecentric.nn.kernels as kernels
from forcecentric.nn.heads import EnergyHead
from forcecentric.nn.kernels import MessageGraph, energy_head, et_front, et_message, et_stack, load_extension

from test_nn import make_model, random_batch, random_orthogonal

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the fused kernels")


@pytest.fixture(scope="module", autouse=True)
def _built():
    load_extension()  # a build failure fails every test here (with the compiler's message)


def _both(model: ForceField, z, pos, batch, **kw):
    model.use_fused_kernels(False)
    eager = model(z, pos, batch, **kw)
    model.use_fused_kernels(True)
    fused = model(z, pos, batch, **kw)
    model.use_fused_kernels(False)
    return eager, fused


def test_message_graph_groups_every_edge_once_by_receiver_and_by_sender():
    gen = torch.Generator().manual_seed(0)
    idx_i = torch.randint(0, 7, (40,), generator=gen)
    idx_j = torch.randint(0, 7, (40,), generator=gen)
    g = MessageGraph.build(idx_i, idx_j, 9)  # atoms 7, 8 have no edges
    assert torch.equal(g.row, idx_i[g.perm]) and torch.equal(g.col, idx_j[g.perm])
    assert bool((g.row[1:] >= g.row[:-1]).all())
    assert g.rowptr.tolist()[-3:] == [40, 40, 40]
    for a in range(9):
        rows = g.row[g.rowptr[a]:g.rowptr[a + 1]]
        assert bool((rows == a).all())
        senders = g.col[g.colperm[g.colptr[a]:g.colptr[a + 1]]]
        assert bool((senders == a).all()) and senders.numel() == int((idx_j == a).sum())


@pytest.mark.parametrize("attn", ["silu", "ssp", "tanh", "gelu"])
@pytest.mark.parametrize("vector_cutoff", [True, False])
def test_kernel_backward_matches_finite_differences(attn, vector_cutoff):
    """gradcheck of the analytic two-pass backward for every input (float64)."""
    gen = torch.Generator().manual_seed(1)
    n, f, heads = 5, 8, 2
    idx_i = torch.randint(0, n, (14,), generator=gen)
    idx_j = torch.randint(0, n, (14,), generator=gen)
    g = MessageGraph.build(idx_i, idx_j, n)
    e = idx_i.numel()

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    inputs = (rnd(n, 5 * f), rnd(n, 3, f), rnd(e, 4 * f), torch.rand(e, generator=gen, dtype=torch.float64).requires_grad_(True),
              rnd(e, 3))
    assert torch.autograd.gradcheck(
        lambda qkv, vec, filt, cut, unit: et_message(qkv, vec, filt, cut, unit, g, heads, attn, vector_cutoff),
        inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["silu", "ssp", "tanh", "gelu"])
@pytest.mark.parametrize("vector_cutoff", [True, False])
def test_layer_fused_equals_eager(attn, vector_cutoff):
    """One attention layer: outputs and all input gradients (float64)."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    n, f, k = 11, 16, 8
    layer = EquivariantAttention(f, k, 4, "silu", attn, vector_cutoff).double()
    idx_i = torch.randint(0, n, (50,), generator=gen)
    idx_j = torch.randint(0, n, (50,), generator=gen)
    x = torch.randn(n, f, generator=gen, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(n, 3, f, generator=gen, dtype=torch.float64, requires_grad=True)
    cut = torch.rand(50, generator=gen, dtype=torch.float64, requires_grad=True)
    rbf = torch.rand(50, k, generator=gen, dtype=torch.float64, requires_grad=True)
    unit = torch.randn(50, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    dx, dvec = layer(x, vec, idx_i, idx_j, cut, rbf, unit)
    g = MessageGraph.build(idx_i, idx_j, n)
    fx, fvec = layer.forward_fused(x, vec, g, cut[g.perm], rbf[g.perm], unit[g.perm])
    torch.testing.assert_close(fx, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fvec, dvec, rtol=1e-12, atol=1e-12)
    w = (torch.randn(n, f, generator=gen, dtype=torch.float64), torch.randn(n, 3, f, generator=gen, dtype=torch.float64))
    wrt = [x, vec, cut, rbf, unit, *layer.parameters()]
    ge = torch.autograd.grad((dx * w[0]).sum() + (dvec * w[1]).sum(), wrt)
    gf = torch.autograd.grad((fx * w[0]).sum() + (fvec * w[1]).sum(), wrt)
    for a, b in zip(gf, ge):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


class _CountStack:
    """Counts the calls of a C++ inference piece, the layer stack by default (to tell which fused
    path ran)."""

    def __init__(self, monkeypatch, function=kernels._ETStack):
        self.calls = 0
        real = function.apply

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(function, "apply", counted)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("hidden,heads", [(32, 4), (48, 2)])  # head size 8 (specialised), 24 (generic)
@pytest.mark.parametrize("stack", [True, False])
def test_model_fused_equals_eager_on_a_batch(dtype, atol, hidden, heads, stack, monkeypatch):
    """Both fused paths: the front, all layers and the head each in one call (inference), and one
    kernel call per layer."""
    count = _CountStack(monkeypatch)
    front = _CountStack(monkeypatch, kernels._ETFront)
    head = _CountStack(monkeypatch, kernels._EnergyHead)
    gen = torch.Generator().manual_seed(3)
    model = make_model(dtype=dtype, hidden_channels=hidden, num_heads=heads).eval()
    model.representation.fused_stack = stack
    z, pos, batch = random_batch([1, 4, 17, 30], gen, dtype=dtype)  # a lone atom, sparse and dense graphs
    eager, fused = _both(model, z, pos, batch)
    assert count.calls == front.calls == head.calls == int(stack)
    torch.testing.assert_close(fused["energy"], eager["energy"], rtol=0, atol=atol * 10)
    torch.testing.assert_close(fused["forces"], eager["forces"], rtol=0, atol=atol)
    assert fused["forces"].abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("act,attn", [("silu", "tanh"), ("ssp", "silu"), ("tanh", "gelu"), ("gelu", "ssp")])
@pytest.mark.parametrize("vector_cutoff", [True, False])
def test_stack_equals_eager_for_every_activation_with_and_without_pairs(act, attn, vector_cutoff, monkeypatch):
    """The one-call stack: filter and attention activations, the vector cutoff, the filters per
    edge and per atom pair, and a denoising head reading the stack's vectors (float64)."""
    count = _CountStack(monkeypatch)
    gen = torch.Generator().manual_seed(10)
    model = make_model(activation=act, attn_activation=attn, vector_cutoff=vector_cutoff, denoise_head=True).eval()
    z, pos, batch = random_batch([5, 13], gen)
    for min_edges in (0, 10**9):
        model.representation.pair_filters_min_edges = min_edges
        eager, fused = _both(model, z, pos, batch)
        for key in ("energy", "forces", "noise_pred"):
            torch.testing.assert_close(fused[key], eager[key], rtol=0, atol=1e-10)
    assert count.calls == 2


@pytest.mark.parametrize("pairs", [True, False])
def test_stack_backward_matches_finite_differences(pairs):
    """gradcheck of the stack's analytic backward for x, vec, rbf, cut and unit (float64), with
    the filters' rows per edge or per atom pair."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    n, f, k, heads = 6, 8, 5, 2
    layers = [EquivariantAttention(f, k, heads, "silu", "silu", True).double() for _ in range(2)]
    params = [p.detach().normal_(0.0, 0.5, generator=gen) for layer in layers for p in layer.stack_parameters()]
    a, b = torch.triu_indices(n, n, 1)
    idx_i, idx_j = torch.cat([a, b]), torch.cat([b, a])  # every pair, both directions
    g = MessageGraph.build(idx_i, idx_j, n)
    e = idx_i.numel()
    if pairs:
        index = torch.minimum(g.row, g.col) * n + torch.maximum(g.row, g.col)
        _, index = torch.unique(index, return_inverse=True)
        rows = int(index.max()) + 1
    else:
        index, rows = None, e

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    inputs = (rnd(n, f), rnd(n, 3, f), rnd(rows, k), torch.rand(e, generator=gen, dtype=torch.float64).requires_grad_(True),
              rnd(e, 3))
    assert torch.autograd.gradcheck(
        lambda x, vec, rbf, cut, unit: et_stack(x, vec, rbf, cut, unit, index, g, params, heads, "silu", "silu", True,
                                                1e-5),
        inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ["silu", "ssp", "tanh", "gelu"])
def test_energy_head_in_cpp_equals_the_module_and_its_backward_matches_finite_differences(act):
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    n, f = 7, 12
    head = EnergyHead(f, act).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.5, generator=gen)
    x = torch.randn(n, f, generator=gen, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(n, 3, f, generator=gen, dtype=torch.float64, requires_grad=True)
    vec.data[0, :, :3] = 0.0  # a zero vector channel (a lone atom's): the norm's epsilon
    params = head.fused_parameters()
    ref, got = head(x, vec), energy_head(x, vec, params, act)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * w).sum(), [x, vec]), torch.autograd.grad((ref * w).sum(), [x, vec])):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(lambda x, vec: energy_head(x, vec, params, act), (x, vec), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("neighbor_embedding", [True, False])
def test_front_in_cpp_equals_eager_and_its_backward_matches_finite_differences(neighbor_embedding):
    """The representation's front: initial scalars, radial basis, cutoff and unit vectors of the
    real edges and the self loops, and the gradient of the positions (float64)."""
    gen = torch.Generator().manual_seed(14)
    model = make_model(neighbor_embedding=neighbor_embedding)
    rep = model.representation
    with torch.no_grad():
        rep.distance_expansion.betas.mul_(0.5)  # trained widths, not the initial ones
    z, pos, batch = random_batch([8], gen)
    idx_i, idx_j = radius_graph(pos, batch, model.cutoff)
    n, e = len(z), len(idx_i)
    params = [rep.embedding.weight, rep.distance_expansion.means, rep.distance_expansion.betas]
    if neighbor_embedding:
        ne = rep.neighbor_embedding
        params += [ne.embedding.weight, ne.distance_proj.weight, ne.distance_proj.bias, ne.combine.weight,
                   ne.combine.bias]

    def eager(p):
        d = p.index_select(0, idx_j) - p.index_select(0, idx_i)
        r = torch.linalg.vector_norm(d, dim=-1)
        att_r = torch.cat([r, r.new_zeros(n)])
        rbf = rep.distance_expansion(att_r)
        x = rep.embedding(z)
        if neighbor_embedding:
            x = rep.neighbor_embedding(z, x, idx_i, idx_j, r, rbf[:e])
        return x, rbf, rep.cutoff_fn(att_r), torch.cat([d / r.unsqueeze(-1), d.new_zeros(n, 3)])

    def front(p):
        return et_front(p, z, idx_i, idx_j, params, rep.cutoff, rep.distance_expansion.alpha)

    p = pos.clone().requires_grad_(True)
    got, ref = front(p), eager(p)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), [p])
    (g_ref,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, weights)), [p])
    torch.testing.assert_close(g_got, g_ref, rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(front, (p,), eps=1e-6, atol=1e-6)


def test_stack_only_where_no_graph_leaves_the_call(monkeypatch):
    """The stack gives no parameter gradients, so the model runs it only for calls whose results
    it detaches: not when the caller's positions require grad (the caller may differentiate the
    energy), not for energies alone; and the flag does not outlive a call that failed."""
    count = _CountStack(monkeypatch)
    gen = torch.Generator().manual_seed(12)
    model = make_model().eval().use_fused_kernels(True)
    rep = model.representation
    z, pos, batch = random_batch([7, 10], gen)
    plain = model(z, pos, batch)
    assert count.calls == 1 and not plain["forces"].requires_grad
    p = pos.clone().requires_grad_(True)
    linked = model(z, p, batch)
    assert count.calls == 1 and linked["energy"].requires_grad
    torch.testing.assert_close(linked["forces"].detach(), plain["forces"], rtol=0, atol=1e-10)
    grads = torch.autograd.grad(linked["energy"].sum(), [rep.layers[0].qkv_proj.weight,
                                                          model.energy_head.block1.vec1_proj.weight])
    assert all(g.abs().max() > 0 for g in grads)  # the per-layer path and the module head give them
    model(z, pos, batch, compute_forces=False)
    assert count.calls == 1

    def fail(*args):
        raise RuntimeError("failed inside the call")

    model.prior.forward = fail
    with pytest.raises(RuntimeError, match="failed inside the call"):
        model(z, pos, batch)
    del model.prior.forward
    assert count.calls == 2 and rep.detached_call is False
    with torch.no_grad():
        model(z, pos, batch)
    assert count.calls == 3 and rep.detached_call is False
    seen = []  # the state is per thread: another thread's call does not mark this one's

    def other_thread():
        rep.detached_call = True
        seen.append(rep.detached_call)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen == [True] and rep.detached_call is False


def test_fused_forces_are_equivariant():
    gen = torch.Generator().manual_seed(4)
    model = make_model().eval().use_fused_kernels(True)
    z, pos, batch = random_batch([12], gen)
    rot = random_orthogonal(gen, reflect=True)
    out = model(z, pos, batch)
    moved = model(z, pos @ rot.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), batch)
    torch.testing.assert_close(moved["energy"], out["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(moved["forces"], out["forces"] @ rot.T, rtol=0, atol=1e-10)


def test_energy_gradients_of_parameters_match_and_training_forces_are_refused():
    gen = torch.Generator().manual_seed(5)
    model = make_model()
    z, pos, batch = random_batch([6, 9], gen)
    model.use_fused_kernels(False)
    ge = torch.autograd.grad(model(z, pos, batch, compute_forces=False)["energy"].sum(), list(model.parameters()),
                             allow_unused=True)
    model.use_fused_kernels(True)
    gf = torch.autograd.grad(model(z, pos, batch, compute_forces=False)["energy"].sum(), list(model.parameters()),
                             allow_unused=True)
    for a, b in zip(gf, ge):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    model.train()
    with pytest.raises(RuntimeError, match="use_fused_kernels\\(False\\)"):
        model(z, pos, batch)  # training mode: forces with create_graph
    model.use_fused_kernels(False)
    assert model(z, pos, batch)["forces"].requires_grad


def test_old_checkpoints_with_separate_projections_load():
    """State dicts from before q/k/v and dk/dv were fused into one matrix each."""
    torch.manual_seed(6)
    layer = EquivariantAttention(16, 8, 4)
    f = 16
    old = {}
    for key, value in layer.state_dict().items():
        if key.startswith("qkv_proj."):
            kind = key.split(".")[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.split(value, [f, f, 3 * f])):
                old[f"{name}.{kind}"] = part.clone()
        elif key.startswith("filter_proj."):
            kind = key.split(".")[1]
            for name, part in zip(("dk_proj", "dv_proj"), torch.split(value, [f, 3 * f])):
                old[f"{name}.{kind}"] = part.clone()
        else:
            old[key] = value.clone()
    fresh = EquivariantAttention(16, 8, 4)
    fresh.load_state_dict(old)
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_calculator_uses_the_kernels_on_cpu_and_follows_the_eager_md():
    torch.manual_seed(7)
    model = make_model(dtype=torch.float32)
    model.elements = [1, 6, 8]
    with pytest.raises(ValueError, match="fused must be"):
        forcecentric.Calculator(model, fused="yes")
    traj = {}
    for fused in (True, False):
        calc = forcecentric.Calculator(model, dtype="float64", fused=fused)
        assert calc.model.uses_fused_kernels is fused
        atoms = molecule("CH3CH2OH")
        atoms.calc = calc
        thermalize_momenta(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
        VelocityVerlet(atoms, timestep=0.5 * units.fs).run(20)
        traj[fused] = (atoms.get_positions(), atoms.get_forces(), atoms.get_potential_energy())
    np.testing.assert_allclose(traj[True][0], traj[False][0], atol=1e-9)
    np.testing.assert_allclose(traj[True][1], traj[False][1], atol=1e-8)
    assert abs(traj[True][2] - traj[False][2]) < 1e-8
    auto = forcecentric.Calculator(model)
    assert auto.model.uses_fused_kernels  # "auto" on a CPU


def test_radius_graph_edges_in_any_order():
    """The kernels sort the edges themselves: a shuffled edge list gives the same result."""
    gen = torch.Generator().manual_seed(8)
    model = make_model().eval().use_fused_kernels(True)
    z, pos, batch = random_batch([15], gen)
    ei = radius_graph(pos, batch, model.cutoff)
    shuffled = ei[:, torch.randperm(ei.shape[1], generator=gen)]
    a = model(z, pos, batch, edge_index=ei)
    b = model(z, pos, batch, edge_index=shuffled)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=0, atol=1e-12)


def test_filters_shared_by_pairs_hold_for_edge_lists_without_their_reverse():
    """The fused path computes the distance filters once per atom pair (i <- j and j <- i share
    them): with a user's edge list where some edges have no reverse, or some appear twice, it
    still gives the energies and forces of the eager model with its filters per edge."""
    gen = torch.Generator().manual_seed(9)
    model = make_model().eval()
    rep = model.representation
    rep.pair_filters_min_edges = 0  # this small batch too
    z, pos, batch = random_batch([9, 14], gen)
    ei = radius_graph(pos, batch, model.cutoff)
    keep = torch.rand(ei.shape[1], generator=gen) < 0.6
    for edges in (ei[:, keep], torch.cat([ei, ei[:, :5]], dim=1)):
        rep.pair_filters = False
        eager = model(z, pos, batch, edge_index=edges)
        rep.pair_filters = True
        fused = _both(model, z, pos, batch, edge_index=edges)[1]
        torch.testing.assert_close(fused["energy"], eager["energy"], rtol=0, atol=1e-10)
        torch.testing.assert_close(fused["forces"], eager["forces"], rtol=0, atol=1e-10)
    assert not torch.equal(_both(model, z, pos, batch, edge_index=ei[:, keep])[1]["forces"],
                           _both(model, z, pos, batch, edge_index=ei)[1]["forces"])


def test_api_predict_uses_the_kernels_for_the_call_and_restores_the_model(monkeypatch):
    from forcecentric.data.conformation import Conformation
    from forcecentric.evaluation import predict

    gen = torch.Generator().manual_seed(9)
    model = make_model().eval()
    recs = []
    for n in (3, 8, 14):
        z, pos, _ = random_batch([n], gen)
        recs.append(Conformation(z=z.numpy(), pos=pos.numpy()))
    model.use_fused_kernels(False)
    count = _CountStack(monkeypatch)  # inference: all layers in one kernel call
    e_fused, f_fused = predict(model, recs, batch_size=2)
    assert count.calls == 2 and not model.uses_fused_kernels  # used for the call, switched back after
    with torch.no_grad():
        e_ref = [model(torch.as_tensor(r.z), torch.as_tensor(r.pos))["energy"].item() for r in recs]
    np.testing.assert_allclose(e_fused, e_ref, rtol=1e-10)  # energies of ~-5,000 eV (atomrefs)
    assert len(f_fused) == 3 and f_fused[2].shape == (14, 3)


@pytest.mark.slow  # compiles the extension once more from scratch (1-2 min); CI runs it with -m slow
def test_a_build_killed_midway_does_not_leave_later_processes_waiting(tmp_path):
    """cpp_extension guards its build with a plain lock file and waits for it without a limit; a
    build killed midway left it behind and every later process hung. Such a leftover is found
    under our own OS-released lock, removed with a warning, and the build goes on."""
    import os
    import subprocess
    import sys

    from forcecentric.nn.kernels import _NAME

    stale = tmp_path / _NAME / "lock"
    stale.parent.mkdir()
    stale.touch()  # what a killed build leaves
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from forcecentric.nn.kernels import load_extension\n"
            "print(load_extension().__name__)")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == _NAME and not stale.exists()
    assert "left behind by a build of the fused kernels that was killed" in done.stderr
    assert (tmp_path / f"{_NAME}.flock").is_file()
