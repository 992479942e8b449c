"""Tests of the neural network: radius graph, ET symmetries, conservative forces, smoothness."""

from __future__ import annotations

import math

import pytest
import torch

from forcecentric.config import ModelConfig
from forcecentric.errors import ElementError
from forcecentric.nn import ForceField, radius_graph
from forcecentric.nn.et import ETRepresentation

ELEMENTS = (1, 6, 7, 8)


def tiny_config(**kw) -> ModelConfig:
    base = dict(hidden_channels=32, num_layers=2, num_heads=4, num_rbf=16)
    base.update(kw)
    return ModelConfig(**base)


def make_model(dtype=torch.float64, seed=0, **kw) -> ForceField:
    torch.manual_seed(seed)
    model = ForceField(tiny_config(**kw))
    with torch.no_grad():  # biases start at zero; make them generic like a trained model's
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    # non-trivial output scale so that forces are not tiny
    model.set_normalization(scale=2.0, shift=-0.3, atomref={1: -13.6, 6: -1029.0, 8: -2041.0})
    return model.to(dtype)


def random_molecule(n: int, gen: torch.Generator, dtype=torch.float64, density: float = 0.08):
    """Random atoms in a cube with a minimum distance of 0.9 A (rejection sampling)."""
    side = (n / density) ** (1.0 / 3.0)
    pts: list[torch.Tensor] = []
    while len(pts) < n:
        p = torch.rand(3, generator=gen, dtype=torch.float64) * side
        if all(float((p - q).norm()) > 0.9 for q in pts):
            pts.append(p)
    z = torch.tensor(ELEMENTS)[torch.randint(len(ELEMENTS), (n,), generator=gen)]
    return z, torch.stack(pts).to(dtype)


def random_batch(sizes, gen, dtype=torch.float64):
    zs, ps, bs = [], [], []
    for k, n in enumerate(sizes):
        z, p = random_molecule(n, gen, dtype)
        zs.append(z)
        ps.append(p)
        bs.append(torch.full((n,), k, dtype=torch.long))
    return torch.cat(zs), torch.cat(ps), torch.cat(bs)


def random_orthogonal(gen: torch.Generator, reflect: bool, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = q @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    return q.to(dtype)


# ----------------------------------------------------------------------------- radius graph
def brute_force_edges(pos, batch, cutoff):
    pos = pos.double()
    d = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")
    mask = (d < cutoff) & (batch[:, None] == batch[None, :])
    mask.fill_diagonal_(False)
    i, j = mask.nonzero(as_tuple=True)
    return edge_set(torch.stack([i, j]))


def edge_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radius_graph_matches_brute_force(dtype):
    gen = torch.Generator().manual_seed(1)
    sizes = [1, 2, 5, 17, 40, 300, 23, 70]
    z, pos, batch = random_batch(sizes, gen, dtype)
    # shuffle atoms so that the batch vector is not sorted
    perm = torch.randperm(pos.shape[0], generator=gen)
    pos, batch = pos[perm], batch[perm]
    ref = brute_force_edges(pos, batch, 5.0)
    for dense_max in (None, 0, 10_000):  # default mix, vesin only, dense only
        ei = radius_graph(pos, batch, 5.0, dense_max_atoms=dense_max)
        assert ei.dtype == torch.long and ei.shape[0] == 2
        assert ei.shape[1] == len(ref), f"dense_max_atoms={dense_max}"
        assert edge_set(ei) == ref
    # the 300-atom molecule has atoms with many neighbours: no cap anywhere
    deg = torch.bincount(ei[0], minlength=pos.shape[0])
    assert int(deg.max()) > 32


def test_radius_graph_dense_cluster_no_cap_and_single_molecule():
    gen = torch.Generator().manual_seed(2)
    # 200 points in a 3 A cube with a 5 A cutoff: (almost) everybody is everybody's neighbour
    pos = torch.rand(200, 3, generator=gen, dtype=torch.float64) * 3.0
    ei = radius_graph(pos, None, 5.0)
    assert edge_set(ei) == brute_force_edges(pos, torch.zeros(200, dtype=torch.long), 5.0)
    assert ei.shape[1] == 200 * 199
    assert radius_graph(pos[:0], None, 5.0).shape == (2, 0)
    assert radius_graph(pos[:1], None, 5.0).shape == (2, 0)


# ----------------------------------------------------------------------------- symmetries
@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 2e-4), (torch.float64, 1e-10)], ids=["float32", "float64"]
)
def test_invariance_and_equivariance(dtype, atol):
    gen = torch.Generator().manual_seed(3)
    model = make_model(dtype, denoise_head=True)
    model.set_normalization(atomref={})  # large reference energies would hide float32 errors
    z, pos, batch = random_batch([9, 14, 6], gen, dtype)
    out = model(z, pos, batch)
    e_scale = out["energy"].abs().max().item()
    f_scale = out["forces"].abs().max().item()
    n_scale = out["noise_pred"].abs().max().item()
    assert f_scale > 1e-3 and n_scale > 1e-4  # the checks below are not vacuous

    for reflect in (False, True):
        rot = random_orthogonal(gen, reflect, dtype)
        assert math.isclose(torch.det(rot.double()).item(), -1.0 if reflect else 1.0, abs_tol=1e-6)
        shift = torch.randn(3, generator=gen, dtype=torch.float64).to(dtype) * 10.0
        perm = torch.randperm(z.shape[0], generator=gen)
        pos2 = (pos @ rot.T + shift)[perm]
        out2 = model(z[perm], pos2, batch[perm])
        torch.testing.assert_close(out2["energy"], out["energy"], atol=atol * e_scale, rtol=0)
        torch.testing.assert_close(
            out2["forces"], (out["forces"] @ rot.T)[perm], atol=atol * max(f_scale, 1), rtol=0
        )
        torch.testing.assert_close(
            out2["noise_pred"], (out["noise_pred"] @ rot.T)[perm], atol=atol, rtol=0
        )


def test_representation_scalars_invariant_vectors_equivariant():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    rep = ETRepresentation(tiny_config()).double()
    z, pos, batch = random_batch([12], gen)
    x, vec = rep(z, pos, batch)
    assert x.shape == (12, 32) and vec.shape == (12, 3, 32)
    assert vec.abs().max() > 1e-3
    rot = random_orthogonal(gen, reflect=True)
    x2, vec2 = rep(z, pos @ rot.T - 3.0, batch)
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(vec2, torch.einsum("ab,nbf->naf", rot, vec), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- batching / locality
def test_batch_equals_one_by_one():
    gen = torch.Generator().manual_seed(5)
    model = make_model(torch.float64, denoise_head=True)
    sizes = [3, 11, 1, 7, 20]
    z, pos, batch = random_batch(sizes, gen)
    out = model(z, pos, batch)
    assert out["energy"].shape == (len(sizes),)
    assert out["forces"].shape == pos.shape
    start = 0
    for k, n in enumerate(sizes):
        sl = slice(start, start + n)
        single = model(z[sl], pos[sl])
        torch.testing.assert_close(out["energy"][k : k + 1], single["energy"], atol=1e-10, rtol=0)
        torch.testing.assert_close(out["forces"][sl], single["forces"], atol=1e-10, rtol=0)
        torch.testing.assert_close(out["noise_pred"][sl], single["noise_pred"], atol=1e-10, rtol=0)
        start += n
    # n_graphs larger than the number of molecules present gives zero energy for the extras
    padded = model(z, pos, batch, n_graphs=len(sizes) + 2)
    torch.testing.assert_close(padded["energy"][: len(sizes)], out["energy"])
    assert torch.all(padded["energy"][len(sizes) :] == 0)


def test_far_apart_molecules_are_additive():
    gen = torch.Generator().manual_seed(6)
    model = make_model(torch.float64)
    za, pa = random_molecule(8, gen)
    zb, pb = random_molecule(6, gen)
    pb = pb + torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64)
    both = model(torch.cat([za, zb]), torch.cat([pa, pb]))  # one system, batch=None
    a, b = model(za, pa), model(zb, pb)
    torch.testing.assert_close(both["energy"], a["energy"] + b["energy"], atol=1e-9, rtol=0)
    torch.testing.assert_close(
        both["forces"], torch.cat([a["forces"], b["forces"]]), atol=1e-10, rtol=0
    )


# ----------------------------------------------------------------------------- forces
def test_forces_are_minus_energy_gradient_finite_differences():
    gen = torch.Generator().manual_seed(7)
    model = make_model(torch.float64).eval()
    z, pos = random_molecule(7, gen)
    forces = model(z, pos)["forces"]
    h = 1e-5
    fd = torch.zeros_like(pos)
    with torch.no_grad():
        for a in range(pos.shape[0]):
            for c in range(3):
                plus, minus = pos.clone(), pos.clone()
                plus[a, c] += h
                minus[a, c] -= h
                e_p = model(z, plus, compute_forces=False)["energy"].sum()
                e_m = model(z, minus, compute_forces=False)["energy"].sum()
                fd[a, c] = -(e_p - e_m) / (2 * h)
    assert forces.abs().max() > 1e-3
    torch.testing.assert_close(forces, fd, atol=1e-7, rtol=1e-6)
    # momentum conservation (translation invariance): forces sum to zero
    torch.testing.assert_close(
        forces.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0
    )


def test_smooth_at_cutoff():
    model = make_model(torch.float64).eval()
    rc = model.config.cutoff
    z = torch.tensor([6, 8])

    def run(r):
        pos = torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0]], dtype=torch.float64)
        out = model(z, pos)
        return out["energy"].item(), out["forces"]

    isolated = model(z[:1], torch.zeros(1, 3, dtype=torch.float64))["energy"].item() + model(
        z[1:], torch.zeros(1, 3, dtype=torch.float64)
    )["energy"].item()
    e_in, f_in = run(rc - 1e-6)
    e_out, f_out = run(rc + 1e-6)
    # beyond the cutoff the atoms do not interact
    assert f_out.abs().max().item() == 0.0
    assert math.isclose(e_out, isolated, abs_tol=1e-12)
    # energy continuous across the cutoff
    assert abs(e_in - e_out) < 1e-9
    # the force of the neighbour vanishes continuously as r -> r_c (linearly for a cosine cutoff)
    f_far = run(rc - 0.1)[1][1, 0].abs().item()
    f_mid = run(rc - 0.01)[1][1, 0].abs().item()
    f_near = run(rc - 0.001)[1][1, 0].abs().item()
    assert f_far > 1e-6
    assert f_mid < 0.2 * f_far and f_near < 0.2 * f_mid
    assert f_in.abs().max().item() < 1e-3 * f_far


def test_isolated_atoms_and_single_atom():
    model = make_model(torch.float64, denoise_head=True)
    z = torch.tensor([1, 8])
    pos = torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]], dtype=torch.float64)
    out = model(z, pos)
    assert torch.all(out["forces"] == 0)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["noise_pred"]).all()
    # second backward through an edge-less system stays finite
    loss = out["energy"].sum() + out["noise_pred"].pow(2).sum()
    loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- modes / graphs
def test_inference_matches_training_and_holds_no_graph():
    gen = torch.Generator().manual_seed(8)
    model = make_model(torch.float32, denoise_head=True)
    z, pos, batch = random_batch([5, 9], gen, torch.float32)
    model.train()
    train_out = model(z, pos, batch)
    assert train_out["forces"].requires_grad  # create_graph defaults to training mode
    model.eval()
    with torch.no_grad():
        eval_out = model(z, pos, batch)
    for key in ("energy", "forces", "noise_pred"):
        assert not eval_out[key].requires_grad and eval_out[key].grad_fn is None
        torch.testing.assert_close(eval_out[key], train_out[key].detach(), atol=1e-5, rtol=1e-5)
    # eval mode without no_grad: no graph kept either
    plain = model(z, pos, batch)
    assert plain["energy"].grad_fn is None and plain["forces"].grad_fn is None
    assert not pos.requires_grad
    # torch.inference_mode (e.g. a Lightning validation loop) works too
    with torch.inference_mode():
        inf_out = model(z, pos, batch)
    torch.testing.assert_close(inf_out["forces"], eval_out["forces"], atol=1e-6, rtol=1e-6)
    # a caller's leaf positions that require grad are left untouched under no_grad
    leaf = pos.clone().requires_grad_(True)
    with torch.no_grad():
        leaf_out = model(z, leaf, batch)
    assert leaf.grad is None and leaf_out["forces"].grad_fn is None
    torch.testing.assert_close(leaf_out["forces"], eval_out["forces"], atol=1e-6, rtol=1e-6)


def test_create_graph_allows_force_loss_backward():
    gen = torch.Generator().manual_seed(9)
    model = make_model(torch.float32)
    model.train()
    z, pos, batch = random_batch([6, 8], gen, torch.float32)
    target = torch.randn(pos.shape, generator=gen)
    out = model(z, pos, batch, create_graph=True)
    loss = (out["forces"] - target).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # a force loss cannot reach the output bias (a constant energy offset); everything else can
    missing = [n for n, g in grads.items() if g is None]
    assert missing == ["energy_head.block2.update_net.2.bias"], missing
    grads = {n: g for n, g in grads.items() if g is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["representation.layers.0.qkv_proj.weight"].abs().sum() > 0
    assert grads["energy_head.block1.vec1_proj.weight"].abs().sum() > 0
    assert grads["representation.distance_expansion.means"].abs().sum() > 0


def test_filters_once_per_atom_pair_give_the_per_edge_forces_and_training_gradients():
    """On a CPU the eager path computes the distance filters once per atom pair (i <- j and
    j <- i share their distance): the energies, forces and the parameter gradients of a force
    loss (the second derivative training takes) are the per-edge ones, also for edge lists
    where some edges have no reverse or appear twice; and the pairs are really used."""
    gen = torch.Generator().manual_seed(10)
    model = make_model()
    rep = model.representation
    z, pos, batch = random_batch([9, 14], gen)
    ei = radius_graph(pos, batch, model.cutoff)
    target = torch.randn(pos.shape, generator=gen, dtype=pos.dtype)
    rows: list[int] = []
    hook = rep.layers[0].filter_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))

    def run(edges, pairs: bool):
        rep.pair_filters, rep.pair_filters_min_edges = pairs, 0
        model.zero_grad(set_to_none=True)
        out = model(z, pos, batch, edge_index=edges, create_graph=True)
        (out["forces"] - target).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["energy"].detach(), out["forces"].detach(), grads

    keep = torch.rand(ei.shape[1], generator=gen) < 0.6
    try:
        for edges in (ei, ei[:, keep], torch.cat([ei, ei[:, :5]], dim=1)):
            n_edges = edges.shape[1] + z.shape[0]  # with the self loops
            e_edge, f_edge, g_edge = run(edges, False)
            assert rows[-1] == n_edges
            e_pair, f_pair, g_pair = run(edges, True)
            lo, hi = torch.minimum(edges[0], edges[1]), torch.maximum(edges[0], edges[1])
            n_pairs = torch.unique(lo * z.shape[0] + hi).shape[0] + z.shape[0]
            assert rows[-1] == n_pairs < n_edges
            torch.testing.assert_close(e_pair, e_edge, rtol=0, atol=1e-10)
            torch.testing.assert_close(f_pair, f_edge, rtol=0, atol=1e-10)
            assert g_pair.keys() == g_edge.keys()
            for name in g_edge:
                torch.testing.assert_close(g_pair[name], g_edge[name], rtol=1e-9, atol=1e-11, msg=name)
        # below the threshold (the default, 256 edges with self loops) the filters stay per edge
        rep.pair_filters, rep.pair_filters_min_edges = True, ei.shape[1] + z.shape[0] + 1
        model(z, pos, batch, edge_index=ei)
        assert rows[-1] == ei.shape[1] + z.shape[0]
    finally:
        hook.remove()


def test_caller_graph_on_pos_is_kept():
    gen = torch.Generator().manual_seed(10)
    model = make_model(torch.float64).eval()
    z, pos0 = random_molecule(6, gen)
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    pos = pos0 * s  # non-leaf positions that depend on a caller's parameter
    out = model(z, pos)
    out["energy"].sum().backward()
    # dE/ds = sum_i dE/dpos_i . pos0_i = -sum F . pos0
    expected = -(out["forces"].detach() * pos0).sum()
    torch.testing.assert_close(s.grad, expected, atol=1e-10, rtol=1e-8)


def test_normalization_and_counts():
    model = make_model(torch.float64)
    z = torch.tensor([6, 1, 1])
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [-0.4, 1.0, 0.0]], dtype=torch.float64)
    base = model(z, pos)
    model.set_normalization(atomref=torch.zeros(model.config.max_z + 1))
    model.set_normalization(atomref={6: 10.0})
    assert model.atomref[6].item() == 10.0 and model.atomref[1].item() == 0.0
    out = model(z, pos)
    expected = base["energy"] - (-1029.0 + 2 * -13.6) + 10.0
    torch.testing.assert_close(out["energy"], expected)
    torch.testing.assert_close(out["forces"], base["forces"])
    model.set_normalization(scale=4.0, shift=0.0)
    assert model.energy_scale.item() == 4.0 and model.energy_shift.item() == 0.0
    torch.testing.assert_close(model(z, pos)["forces"], 2.0 * base["forces"])
    with pytest.raises(ElementError):
        model.set_normalization(atomref={500: 1.0})
    with pytest.raises(ValueError):
        model.set_normalization(scale=float("nan"))
    assert "prior.atomref" in model.state_dict()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0
    assert model.denoise_head is None and "noise_pred" not in out
    with pytest.raises(TypeError, match="model.double"):
        model(z, pos.float())
    # a plain dict is validated into a ModelConfig
    assert ForceField(dict(hidden_channels=16, num_layers=1, num_heads=2)).config.num_rbf == 32


def test_float64_and_float32_agree():
    gen = torch.Generator().manual_seed(11)
    model = make_model(torch.float64)
    z, pos, batch = random_batch([10, 4], gen)
    out64 = model(z, pos, batch)
    out32 = model.float()(z, pos.float(), batch)
    assert out32["energy"].dtype == torch.float32 and out64["forces"].dtype == torch.float64
    torch.testing.assert_close(out32["forces"].double(), out64["forces"], atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_matches_eager():
    gen = torch.Generator().manual_seed(12)
    model = make_model(torch.float64, denoise_head=True).eval()
    z, pos, batch = random_batch([5, 8], gen)
    edge_index = radius_graph(pos, batch, model.config.cutoff)
    scripted = torch.jit.script(model)
    out_s = scripted(z, pos, batch, None, True, None, edge_index)
    out_e = model(z, pos, batch)
    for key in ("energy", "forces", "noise_pred"):
        torch.testing.assert_close(out_s[key], out_e[key], atol=1e-12, rtol=0)
