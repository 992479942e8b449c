"""Meaning of each force-centric loss term and of the per-sample masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forcecentric.config import DenoiseConfig, LossConfig
from forcecentric.data import Conformation
from forcecentric.data.dataset import collate
from forcecentric.objectives import (denoising_target, energy_loss, force_matching_loss, make_views,
                                     total_loss, zero_force_loss)


def _batch():
    rng = np.random.default_rng(0)
    pos3 = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    recs = [
        Conformation(z=[8, 1, 1], pos=pos3, energy=-1.0, forces=rng.normal(size=(3, 3))),  # off-eq
        Conformation(z=[8, 1, 1], pos=pos3 + 5, energy=-2.0, forces=np.zeros((3, 3)), equilibrium=True),
        Conformation(z=[6, 8], pos=[[0, 0, 0], [1.2, 0, 0]], energy=None, forces=rng.normal(size=(2, 3))),
        Conformation(z=[6, 8], pos=[[0, 0, 0], [1.13, 0, 0]], equilibrium=True),  # minimum, no labels
    ]
    return collate(recs)


def test_zero_force_loss_is_zero_exactly_when_forces_vanish():
    mask = torch.tensor([True, True, False])
    assert zero_force_loss(torch.zeros(3, 3), mask).item() == 0.0
    f = torch.zeros(3, 3)
    f[2] = 5.0  # outside the mask: still zero
    assert zero_force_loss(f, mask).item() == 0.0
    f[0, 1] = 0.5
    assert zero_force_loss(f, mask).item() == pytest.approx(0.25 / 2)


def test_force_matching_is_mean_squared_norm_over_selected_atoms():
    pred = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [9.0, 9, 9]])
    ref = torch.zeros(3, 3)
    mask = torch.tensor([True, True, False])
    assert force_matching_loss(pred, ref, mask).item() == pytest.approx((1 + 4) / 2)
    assert force_matching_loss(pred, ref, torch.zeros(3, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("target", ["harmonic", "eps", "eps_over_sigma2"])
def test_denoising_target_points_back_to_the_minimum(target):
    cfg = DenoiseConfig(sigma=0.05, target=target, kappa=3.0)
    eps = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    t = denoising_target(eps, cfg)
    displacement = cfg.sigma * eps  # x~ - x0
    # antiparallel to the displacement, atom by atom
    cos = (t * displacement).sum(-1) / (t.norm(dim=-1) * displacement.norm(dim=-1))
    assert torch.allclose(cos, -torch.ones(50), atol=1e-6)
    if target == "harmonic":
        assert torch.allclose(t, -3.0 * displacement)
    # following the target moves the noisy geometry back towards x0
    x0 = torch.zeros(50, 3)
    x_noisy = x0 + displacement
    step = x_noisy + 1e-4 * t / t.norm(dim=-1, keepdim=True)
    assert ((step - x0).norm(dim=-1) < (x_noisy - x0).norm(dim=-1)).all()


def test_masks_select_the_right_samples():
    b = _batch()
    cfg = LossConfig(force=1.0, zero_force=1.0, denoise=1.0, energy=1.0)
    v = make_views(b, cfg, torch.Generator().manual_seed(0))
    # original 10 atoms + noisy copies of the two minima (3 + 2 atoms)
    assert v.batch.z.shape[0] == 15 and v.batch.n_graphs == 6
    assert v.force_atoms.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 2 + [False] * 5
    assert v.zero_atoms.tolist() == [False] * 3 + [True] * 3 + [False] * 2 + [True] * 2 + [False] * 5
    assert v.denoise_atoms.tolist() == [False] * 10 + [True] * 5
    # energy only for off-equilibrium molecules that have one
    assert v.energy_graphs.tolist() == [True, False, False, False, False, False]
    # the noisy copies are the minima displaced by about sigma, and the target points back
    disp = v.batch.pos[10:] - torch.cat([b.pos[3:6], b.pos[8:10]])
    assert 0.005 < disp.abs().mean().item() < 0.2
    assert ((v.denoise_target[10:] * disp).sum(-1) < 0).all()
    assert v.denoise_target[:10].abs().sum().item() == 0.0


def test_switched_off_terms_add_no_views():
    b = _batch()
    v = make_views(b, LossConfig(force=1.0, zero_force=0.0, denoise=0.0))
    assert v.batch.n_graphs == 4 and not v.zero_atoms.any() and not v.denoise_atoms.any()


def test_total_loss_is_the_weighted_sum_and_terms_are_separate():
    b = _batch()
    cfg = LossConfig(force=2.0, zero_force=0.5, denoise=0.25, energy=3.0)
    v = make_views(b, cfg, torch.Generator().manual_seed(0))
    n = v.batch.z.shape[0]
    out = {"forces": torch.ones(n, 3), "energy": torch.zeros(v.batch.n_graphs)}
    terms = total_loss(out, v, cfg)
    expected = 2.0 * terms["force"] + 0.5 * terms["zero_force"] + 0.25 * terms["denoise"] + 3.0 * terms["energy"]
    assert terms["loss"].item() == pytest.approx(expected.item())
    assert terms["zero_force"].item() == pytest.approx(3.0)  # |(1,1,1)|^2
    assert terms["energy"].item() == pytest.approx((1.0 / 3) ** 2)
    assert all(torch.isfinite(t) for t in terms.values())


def test_denoising_through_a_head_needs_the_head():
    b = _batch()
    cfg = LossConfig(denoise=1.0, denoising=DenoiseConfig(through="head"))
    v = make_views(b, cfg)
    out = {"forces": torch.zeros(v.batch.z.shape[0], 3), "energy": torch.zeros(v.batch.n_graphs)}
    with pytest.raises(ValueError, match="denoise_head"):
        total_loss(out, v, cfg)
    out["noise_pred"] = v.denoise_target.clone()
    assert total_loss(out, v, cfg)["denoise"].item() == 0.0


def test_energy_loss_ignores_missing_labels():
    pred = torch.tensor([1.0, 2.0])
    ref = torch.tensor([0.0, float("nan")], dtype=torch.float64)
    loss = energy_loss(pred, ref, torch.tensor([2, 3]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx(0.25)
